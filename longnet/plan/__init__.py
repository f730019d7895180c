"""Plan a long sequence-parallel run: per-rank memory, traffic and time for N tokens
on P devices, without running anything.

:func:`plan_run` answers, for a model's attention configuration (heads, key/value
heads, head dim, dtype, patterns, layers, causal, position offset) and a sequence of
``N`` tokens on ``P`` ranks, per rank and per layer:

* the key/value bytes sent and received by
  :func:`longnet.parallel.sequence_parallel_dilated_attention`, forward and
  backward (the numbers :func:`longnet.parallel.comm_stats` counts in a real run);
* the attention's activation memory: what one layer's attention keeps from forward
  to backward (q, k, v, outputs, log-sum-exps, the gathered dilated key/value rows,
  the received keys' results and their merge);
* the FLOPs the patterns need (``4 * D`` per attended query/key pair forward, 2.5x
  that backward);
* with a device speed and a link speed, the estimated compute and communication
  time and their ratio.

Packed rows (``doc_lengths``, ``--doc-lengths`` / ``--doc-length-dist``) are planned
as ``cu_seqlens`` runs them: each document alone, those that cross a rank boundary
segment by segment.

It follows the sequence-parallel planner itself (the head groups of every
rank-crossing segment, :mod:`longnet.parallel.layout`) but visits each crossing
segment once for all of its ranks and counts rows instead of building index
tensors, so its work grows with the number of ranks and patterns, not with the
sequence's length: a billion tokens on 1024 ranks plan in about a second.

:func:`plan_training` adds a LongNetLM training step on a ``(dp, sp)`` mesh: FSDP2
parameter, gradient and AdamW memory, every activation kept for backward, and the
traffic per rank and step.

The modules: :mod:`~longnet.plan.cost` (:func:`plan_run`, :class:`RunPlan`),
:mod:`~longnet.plan.counting` (the per-rank rows, calls, pairs and attention memory
behind it), :mod:`~longnet.plan.training` (:func:`plan_training`),
:mod:`~longnet.plan.documents` (packed document lengths), :mod:`~longnet.plan.sweeps`
(patterns, :func:`scaling_sweep`, :func:`fit_ranks`), :mod:`~longnet.plan.units`
(counts, bytes) and :mod:`longnet.plan.__main__` (the command line).

Command line (``python -m longnet.plan --help``)::

    python -m longnet.plan --tokens 1G --ranks 1024 --heads 12 --head-dim 64 \\
        --dtype bfloat16 --first-w 2048 --first-r 1 --factor 2 --layers 12 --causal \\
        --tflops 400 --link-gbs 50
"""

from __future__ import annotations

from collections.abc import Sequence

from longnet.plan.cost import RankCost, RunPlan, plan_run
from longnet.plan.documents import document_lengths
from longnet.plan.sweeps import fit_ranks, geometric_patterns, scaling_sweep
from longnet.plan.training import (
    TrainingPlan,
    fsdp_shard_elements,
    layer_activation_bytes,
    plan_training,
)
from longnet.plan.units import DTYPE_BYTES, parse_count

__all__ = [
    "DTYPE_BYTES",
    "RankCost",
    "RunPlan",
    "TrainingPlan",
    "plan_training",
    "layer_activation_bytes",
    "fsdp_shard_elements",
    "plan_run",
    "geometric_patterns",
    "parse_count",
    "scaling_sweep",
    "fit_ranks",
    "document_lengths",
    "main",
]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m longnet.plan`` on ``argv`` (default ``sys.argv[1:]``): see
    :mod:`longnet.plan.__main__`."""
    # Imported here: ``python -m longnet.plan`` runs that module as ``__main__`` after
    # importing this package, and a copy imported by the package first would warn.
    from longnet.plan.__main__ import main as command_line

    return command_line(argv)
