"""Loads the compiled kernels once per process; never raises.

`eagle_fast._C` registers the C++ CPU kernels under the `eagle_fast::` namespace and
`eagle_fast._C_cuda` the CUDA ones. When either is missing (a source checkout without a build,
a CPU-only torch) the ops fall back to their pure-torch references and one warning says so.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import warnings
from collections.abc import Iterator

import torch


@functools.cache
def load_compiled() -> bool:
    """Import `_C` (and `_C_cuda` on a CUDA build of torch). True when `_C` loaded.

    EAGLE_FAST_DISABLE_COMPILED=1 skips both, to run (and test) the pure-torch fallback.
    """
    if os.environ.get("EAGLE_FAST_DISABLE_COMPILED") == "1":
        warnings.warn(
            "eagle_fast: compiled kernels disabled by EAGLE_FAST_DISABLE_COMPILED=1; using the "
            "pure-torch reference ops",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    try:
        importlib.import_module("eagle_fast._C")
    except ImportError as exc:  # a missing or mismatched build: fall back, loudly, once
        warnings.warn(
            f"eagle_fast: compiled kernels unavailable ({exc}); using the pure-torch reference ops",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    if torch.version.cuda:
        try:
            importlib.import_module("eagle_fast._C_cuda")
        except ImportError:
            pass  # a build made without nvcc has no CUDA kernels; has_cuda_kernels() reports it
    return True


def has_compiled_ops() -> bool:
    return load_compiled()


@functools.cache
def has_cuda_kernels() -> bool:
    if not load_compiled() or not torch.version.cuda:
        return False
    try:
        importlib.import_module("eagle_fast._C_cuda")
    except ImportError:
        return False
    return True


@functools.cache
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_REFERENCE: contextvars.ContextVar[bool] = contextvars.ContextVar("eagle_fast_reference_ops", default=False)


@contextlib.contextmanager
def reference_ops(enabled: bool = True) -> Iterator[None]:
    """Within the block every op called with backend="auto" runs its pure-torch reference: the
    naive path of a whole model, to compare against its fast path. Thread- and task-local."""
    token = _REFERENCE.set(enabled)
    try:
        yield
    finally:
        _REFERENCE.reset(token)


def reference_active() -> bool:
    return _REFERENCE.get()
