"""The independent implementations that labkit's optimizers are checked against (tests, benchmark,
lesson 4). They are optional: ``python3 course.py`` installs them from requirements/references.txt.

- ``timm_lamb()``: ``timm.optim.Lamb``; with ``max_grad_norm=None, always_adapt=True`` it is the
  paper's algorithm. ``import timm`` imports torchvision, whose PyPI builds need a CUDA torch (with
  a CPU torch the import fails), so this loads timm's own ``optim/lamb.py``, which needs only torch,
  without the rest of the package: the same code, wherever timm is installed.
- ``torch_optimizer_lamb()``: ``torch_optimizer.Lamb``, the variant without bias correction and with
  the weight norm clamped at 10.
- ``fairscale_adascale()``: ``fairscale.optim.AdaScale``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

__all__ = ["timm_lamb", "torch_optimizer_lamb", "fairscale_adascale"]

INSTALL = "pip install --no-deps -r requirements/references.txt"


def _missing(package: str) -> ImportError:
    return ImportError(f"{package} is not installed: it is a test-only reference. From the repository root: {INSTALL}")


def timm_lamb():
    """The class ``Lamb`` of timm's ``timm/optim/lamb.py``."""
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        raise _missing("timm")
    # A package of timm's optim folder alone: its lamb.py imports only torch and two sibling modules.
    name = "_timm_optim_only"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(os.path.dirname(spec.origin), "optim")]
        sys.modules[name] = package
    return importlib.import_module(f"{name}.lamb").Lamb


def torch_optimizer_lamb():
    """The class ``torch_optimizer.Lamb``."""
    try:
        import torch_optimizer
    except ImportError as exc:
        raise _missing("torch_optimizer") from exc
    return torch_optimizer.Lamb


def fairscale_adascale():
    """The class ``fairscale.optim.AdaScale``."""
    try:
        from fairscale.optim import AdaScale
    except ImportError as exc:
        raise _missing("fairscale") from exc
    return AdaScale
