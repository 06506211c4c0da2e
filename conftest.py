import atexit
import collections
import os
import shutil
import tempfile
import uuid

import pytest

# Workers are processes; one BLAS/OpenMP thread each keeps 2-core CI machines responsive.
os.environ.setdefault("OMP_NUM_THREADS", "1")

_SOCKETS = None


def over_unix_sockets(manager_class):
    """``manager_class`` whose kernels talk over Unix sockets in a folder of this session, not over TCP
    ports. jupyter_client picks a free port and the kernel binds it a moment later; with several
    pytest-xdist workers starting kernels and launching processes, another process now and then took
    the port in between ("Kernel died before replying to kernel_info")."""
    if os.name != "posix":
        return manager_class

    class Manager(manager_class):
        def __init__(self, **kwargs):
            global _SOCKETS
            if _SOCKETS is None:
                _SOCKETS = tempfile.mkdtemp(prefix="labkit-kernels-")
                atexit.register(shutil.rmtree, _SOCKETS, ignore_errors=True)
            kwargs.setdefault("transport", "ipc")
            kwargs.setdefault("ip", os.path.join(_SOCKETS, uuid.uuid4().hex[:12]))
            super().__init__(**kwargs)

    Manager.__name__ = Manager.__qualname__ = f"{manager_class.__name__}OverUnixSockets"
    return Manager


try:                      # nbval's kernels (the notebooks' cells)
    import nbval.kernel
    nbval.kernel.KernelManager = over_unix_sockets(nbval.kernel.KernelManager)
except ImportError:
    pass


@pytest.fixture
def kernel_manager_class():
    """For nbclient.NotebookClient(kernel_manager_class=...): its kernels over Unix sockets too."""
    from jupyter_client.manager import AsyncKernelManager
    return over_unix_sockets(AsyncKernelManager)


@pytest.fixture
def start_kernel():
    """jupyter_client.manager.start_new_kernel, its kernel over Unix sockets: (manager, client)."""
    from jupyter_client.manager import KernelManager

    def start(kernel_name: str = "python3", startup_timeout: float = 60):
        km = over_unix_sockets(KernelManager)(kernel_name=kernel_name)
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=startup_timeout)
        except RuntimeError:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
            raise
        return km, kc
    return start


# The longest test files first (seconds on one worker of the 2-core CI machine, 2026-12-07). `course.py
# test` hands whole files to three pytest-xdist workers in the order collected here; the browser
# tests (about 3.5 minutes on one worker) used to be handed out late, and one worker ran them for a
# minute and a half after the other two had finished. Then the other files, the most tests first, as
# pytest-xdist orders them by itself (its reordering is turned off by `course.py test`, since it
# would undo this order). Only the order changes: which tests run is unaffected.
LONGEST_FILES = ("tests/test_browser.py",          # 225 s
                 "tests/test_checks_ex05.py",      # 107 s
                 "tests/test_exercises.py",        # 88 s
                 "tests/test_checks_ex03.py")      # 67 s


def pytest_collection_modifyitems(config, items):
    # In every pytest run (the xdist workers collect, and their dist option reads "no"); a stable sort on
    # keys equal within a file, so each file stays together and in its order (a notebook's cells too).
    path = {item: item.nodeid.split("::")[0] for item in items}
    tests = collections.Counter(path.values())
    longest = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: (longest.get(path[item], len(longest)), -tests[path[item]]))
