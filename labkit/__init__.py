"""labkit: the companion package of the course on distributed training of large models.

Every concept of the course is built here from scratch, small enough to read as part of the lecture,
and checked against PyTorch's own implementation. Start with :func:`labkit.launch`; every message the
lessons send goes through :mod:`labkit.comm`.
"""

from labkit.launcher import WorkerError, launch

__version__ = "0.1.0"
__all__ = ["launch", "WorkerError", "__version__"]
