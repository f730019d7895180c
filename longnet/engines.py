"""Choice of the engine that runs ``longnet.dilated_attention`` (docs/operator.md).

An engine changes how the operator is computed, never what:

* ``fused``: the project's own kernels (the CPU default; on CUDA only when forced);
* ``cpu_flash``, ``math``, ``cuda_flash``, ``cuda_cudnn``, ``cuda_efficient``: the
  composition of dense attention problems over strided views, each run on that dense
  kernel (ATen's CPU flash attention; plain matmul/softmax on any device; ATen's
  FlashAttention-2, cuDNN and memory-efficient CUDA kernels);
* ``auto``: ``fused`` on CPU; on CUDA ``cuda_flash`` or ``cuda_cudnn`` where they
  apply (bfloat16/float16), ``cuda_efficient`` for float32, ``math`` otherwise.

``fused`` runs on CUDA only in a build with ``LONGNET_FUSED_CUDA=1``; the CUDA engines
need a CUDA build (``engine_built``). A testing build (``LONGNET_BUILD_TESTING=1``)
adds engines for tests, which ``longnet.testing`` reaches and ``ENGINES`` does not
list.

The environment variable ``LONGNET_ENGINE`` forces an engine for the process;
``use_engine`` forces one for a block of code in the current thread (it wins over
the variable). A forced engine that cannot run a call raises an error that says why.
An autograd backward runs on the engine forced when its forward ran, even outside
the ``use_engine`` block or on another thread. ``last_engine()`` names the engine that
ran the most recent forward or backward call of this thread (an autograd backward that
runs on another thread counts for the thread that ran the forward).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from longnet import _C

__all__ = ["ENGINES", "use_engine", "last_engine", "engine_built"]

ENGINES: tuple[str, ...] = ("auto",) + tuple(_C._engine_names())
"""Every engine name ``use_engine`` and ``LONGNET_ENGINE`` accept (built or not)."""

# Engines of backward calls that autograd ran on another thread, per forward thread:
# thread id -> (sequence number, engine).
_reported: dict[int, tuple[int, str]] = {}
_reported_lock = threading.Lock()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; expected one of {', '.join(ENGINES)}")
    return name


@contextlib.contextmanager
def use_engine(name: str) -> Iterator[None]:
    """Run the operator on engine ``name`` inside the block (this thread only).

    Raises:
        ValueError: for a name not in ``ENGINES``. A call inside the block raises a
            RuntimeError naming the reason when the engine cannot run it.
    """
    _check_name(name)
    with _forced(name):
        yield


@contextlib.contextmanager
def _forced(name: str) -> Iterator[None]:
    """Force engine ``name`` (checked by the caller) inside the block, this thread."""
    previous = _C._forced_engine()
    _C._set_engine(name)
    try:
        yield
    finally:
        _C._set_engine(previous)


def last_engine() -> str | None:
    """The engine that ran the most recent operator call (forward or backward) of
    this thread, or None before any call."""
    seq, name = _C._last_engine()
    with _reported_lock:
        other = _reported.get(threading.get_ident())
    if other is not None and other[0] > seq:
        seq, name = other
    return name if seq > 0 else None


def engine_built(name: str) -> bool:
    """Whether engine ``name`` is compiled into this installation (the CUDA engines
    need a CUDA build); ``auto`` always is."""
    return _check_name(name) == "auto" or bool(_C._engine_built(name))


def _capture() -> tuple[str, int]:
    """State an autograd backward needs to run as its forward did: the forced engine
    and the forward's thread."""
    return _C._forced_engine(), threading.get_ident()


@contextlib.contextmanager
def _backward_scope(captured: tuple[str, int] | None) -> Iterator[None]:
    """Run a backward on the engine forced when its forward ran (when one was; else
    on the choice in force now); when it runs on another thread, report its engine to
    the forward's thread."""
    if captured is None:
        yield
        return
    forced, thread = captured
    previous = _C._forced_engine()
    if forced:
        _C._set_engine(forced)
    try:
        yield
    finally:
        _C._set_engine(previous)
    if thread != threading.get_ident():
        seq, name = _C._last_engine()
        if seq > 0:
            with _reported_lock:
                _reported[thread] = (seq, name)
