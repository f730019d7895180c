"""Engines and build facts for tests (docs/operator.md, "Engines" and "Builds").

A testing build of the extension (``LONGNET_BUILD_TESTING=1 pip install
--no-build-isolation -e .``) compiles in, besides everything a default build has:

* the CPU contract engines ``contract_cuda_flash``, ``contract_cuda_efficient`` and
  ``contract_cuda_cudnn``: the composition and argument preparation of the CUDA
  engine of that kernel, then dense float32 attention on CPU that enforces the
  kernel's input contract; never chosen by ``auto`` and not in
  ``longnet.engines.ENGINES``: ``use_engine`` below forces them;
* the test operators ``torch.ops.longnet._contract_kernel_forward/_backward``;
* the ``LONGNET_DEBUG_SKIP_ROW`` switch of the fused kernels.

In a testing build::

    import longnet.testing

    with longnet.testing.use_engine("contract_cuda_flash"):
        out = longnet.dilated_attention(q, k, v, segment_lengths, dilation_rates)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from longnet import _C
from longnet import engines as _engines

__all__ = [
    "BUILD_COMMAND",
    "CONTRACT_ENGINES",
    "ENGINES",
    "FUSED_CUDA",
    "TESTING_BUILD",
    "engine_built",
    "use_engine",
]

_FLAGS = frozenset(_C._build_flags())

TESTING_BUILD: bool = "testing" in _FLAGS
"""Whether longnet._C is a testing build (``LONGNET_BUILD_TESTING=1``)."""

FUSED_CUDA: bool = "fused_cuda" in _FLAGS
"""Whether the fused engine's CUDA kernels are built in (``LONGNET_FUSED_CUDA=1``)."""

BUILD_COMMAND = "LONGNET_BUILD_TESTING=1 pip install --no-build-isolation -e ."
"""The command, from the repository root, that makes a testing build."""

CONTRACT_ENGINES: tuple[str, ...] = (
    "contract_cuda_flash",
    "contract_cuda_efficient",
    "contract_cuda_cudnn",
)
"""The CPU contract engines of a testing build."""

ENGINES: tuple[str, ...] = _engines.ENGINES + CONTRACT_ENGINES
"""Every engine name ``use_engine`` accepts: ``longnet.engines.ENGINES`` and the
contract engines."""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; expected one of {', '.join(ENGINES)}")
    return name


def engine_built(name: str) -> bool:
    """Whether engine ``name`` is compiled into this installation (the contract engines:
    a testing build); ``auto`` always is.

    Raises:
        ValueError: for a name not in ``ENGINES``.
    """
    return _check_name(name) == "auto" or bool(_C._engine_built(name))


@contextlib.contextmanager
def use_engine(name: str) -> Iterator[None]:
    """``longnet.use_engine`` that also takes the contract engines: run the operator on
    engine ``name`` inside the block (this thread only).

    Raises:
        ValueError: for a name not in ``ENGINES``.
        RuntimeError: for a contract engine outside a testing build, saying how to make
            one.
    """
    _check_name(name)
    if name in CONTRACT_ENGINES and not TESTING_BUILD:
        raise RuntimeError(
            f"engine {name!r} is compiled only into a testing build of longnet; build one "
            f"with `{BUILD_COMMAND}` from the repository root"
        )
    with _engines._forced(name):
        yield
