"""Where a training step is, so that a collective that fails or times out (a dead or
hung rank) can be named: gloo and NCCL report only "timed out waiting for recv".

:func:`phase` names the collectives of a block, :func:`label_collectives` names those
of every FSDP2 unit of a parallelized model as it runs, and :func:`current_phase`
reads the name back (e.g. in the handler of the error a collective raised).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from longnet.model import LongNetLM

__all__ = ["current_phase", "phase", "label_collectives"]

_phase = ["outside a training step"]


def current_phase() -> str:
    """The collective a rank is in or about to enter (see :func:`label_collectives`)."""
    return _phase[0]


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Name the collectives run inside the block (restored afterwards)."""
    old, _phase[0] = _phase[0], name
    try:
        yield
    finally:
        _phase[0] = old


def label_collectives(model: LongNetLM) -> None:
    """Set :func:`current_phase` to the FSDP2 unit a rank is running: before each
    decoder layer's and the root's forward (its parameters' all-gather, then the
    layer's sequence-parallel exchange) and before its backward (the all-gather
    again, the exchange's backward, its gradients' reduce-scatter)."""
    units = [(f"decoder.layers.{i}", layer) for i, layer in enumerate(model.decoder.layers)]
    units.append(("the root (embedding, final norm)", model))
    for name, unit in units:

        def before(module, args, kwargs, name=name):
            _phase[0] = (
                f"forward of {name} (FSDP2 all-gather of its parameters, "
                "sequence-parallel key/value exchange)"
            )

        def after(module, args, kwargs, out, name=name):
            t = out[-1] if isinstance(out, tuple) else out
            if isinstance(t, Tensor) and t.requires_grad:
                t.register_hook(
                    lambda g: _phase.__setitem__(
                        0,
                        (
                            f"backward of {name} (FSDP2 all-gather of its parameters, the key/value "
                            "exchange's backward, reduce-scatter of its gradients)"
                        ),
                    )
                )

        unit.register_forward_pre_hook(before, prepend=True, with_kwargs=True)
        unit.register_forward_hook(after, with_kwargs=True)
