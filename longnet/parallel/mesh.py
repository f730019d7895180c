"""Data x sequence parallel training of a :class:`~longnet.model.LongNetLM` on a
``DeviceMesh`` with dimensions ``("dp", "sp")``, with PyTorch's own tools.

* :func:`build_mesh`: the 2-D mesh from ``(dp, sp)``, with clear errors.
* :func:`parallelize`: applies every parallelism to a plain model, in torchtitan's
  order: sequence parallelism (every attention layer's group is ``mesh["sp"]``),
  per-layer activation checkpointing, per-layer ``torch.compile``, then FSDP2
  ``fully_shard`` of every decoder layer and of the root over the flattened
  ``dp x sp`` mesh (mixed precision through FSDP2's ``MixedPrecisionPolicy``).
* :func:`local_batch`, :func:`mean_over_mesh`, :func:`sum_over_mesh`: this rank's
  block of a global batch, and the mean or sum of per-rank numbers;
  :func:`evaluate_loss`: a model's mean loss over batches, over the mesh.

The degrees are validated once by :class:`~longnet.parallel.dims.ParallelDims`,
which :func:`build_mesh` uses.

Why the parameters are sharded over ``dp x sp`` and not over ``dp`` alone: the
sequence-parallel ranks of one ``dp`` row hold the same parameters and each computes
a part of their gradient (the attention backward sends every rank the gradient of
the rows it sent), so gradients must be reduced over both dimensions; one
reduce-scatter over the flattened mesh does that and leaves each rank ``1 / (dp *
sp)`` of the parameters, gradients and optimizer state. FSDP2 averages the
gradients over the ``dp * sp`` ranks; each rank's loss is the mean over its own
``(B / dp) x (N / sp)`` tokens, so the average is the gradient of the global mean
loss when every rank holds the same number of counted targets (no padding).

Example (under ``torchrun --nproc_per_node 4``)::

    dist.init_process_group("gloo")
    mesh = build_mesh(dp=2, sp=2, seq_len=4096)
    model = parallelize(LongNetLM(config), mesh, activation_checkpointing=True)
    x, y = local_batch(x_global, mesh), local_batch(y_global, mesh)
    _, loss = model(x, y)
    loss.backward()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from longnet.parallel.dims import MESH_DIMS, ParallelDims
from longnet.parallel.phases import label_collectives, phase

if TYPE_CHECKING:
    from longnet.model import LongNetLM

__all__ = [
    "build_mesh",
    "mesh_shape",
    "parallelize",
    "local_batch",
    "mean_over_mesh",
    "sum_over_mesh",
    "flat_mesh",
    "evaluate_loss",
]

_FLAT = "dp_sp"


def build_mesh(dp: int, sp: int, *, device_type: str | None = None, seq_len: int | None = None):
    """A ``DeviceMesh`` of shape ``(dp, sp)`` named ``("dp", "sp")`` over the world
    (:meth:`ParallelDims.build_mesh <longnet.parallel.dims.ParallelDims.build_mesh>`
    of the degrees checked against the world).

    Rank ``r`` sits at ``(r // sp, r % sp)``: the ``sp`` ranks of one sequence are
    consecutive (on one machine when ``sp`` divides the GPUs per machine).

    Args:
        dp: data-parallel degree (sequences of the global batch are split over it).
        sp: sequence-parallel degree (every sequence is split over it).
        device_type: ``"cpu"`` or ``"cuda"``; default ``"cuda"`` if the default
            process group's backend is NCCL, else ``"cpu"``.
        seq_len: when given, checked to be divisible by ``sp``.

    Raises:
        RuntimeError: no process group, or world size != ``dp * sp``.
        ValueError: ``dp``/``sp`` not ints >= 1, or ``seq_len % sp != 0``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "build_mesh needs an initialized default process group: run under "
            "torchrun and call torch.distributed.init_process_group() first"
        )
    dims = ParallelDims(dp, sp, dist.get_world_size())
    dims.check_batch(seq_len=seq_len)
    return dims.build_mesh(device_type)


def mesh_shape(mesh) -> tuple[int, int]:
    """``(dp, sp)`` of a mesh with dimensions named ``("dp", "sp")``; raises a
    ``ValueError`` naming the missing dimensions otherwise."""
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    missing = [d for d in MESH_DIMS if d not in names]
    if missing or len(names) != 2:
        raise ValueError(
            f"the mesh must have exactly the dimensions {MESH_DIMS} (either may have size 1), "
            f"got {names or 'unnamed dimensions'}{f'; missing {missing}' if missing else ''}: "
            "build it with longnet.parallel.build_mesh(dp, sp) or "
            "init_device_mesh(device, (dp, sp), mesh_dim_names=('dp', 'sp'))"
        )
    return mesh["dp"].size(), mesh["sp"].size()


def flat_mesh(mesh):
    """The 1-D ``dp x sp`` mesh that FSDP2 shards over (created once, then reused)."""
    mesh_shape(mesh)
    known = getattr(mesh._get_root_mesh(), "_flatten_mapping", {})
    if _FLAT in known:
        return known[_FLAT]
    return mesh["dp", "sp"]._flatten(_FLAT)


def parallelize(
    model: LongNetLM,
    mesh,
    *,
    activation_checkpointing: bool = False,
    mp_policy=None,
    compile: bool | str = False,
    reshard_after_forward: bool = True,
) -> LongNetLM:
    """Parallelize a :class:`~longnet.model.LongNetLM` in place over a ``("dp", "sp")``
    mesh and return it.

    1. Sequence parallelism: every attention layer's group is
       ``mesh["sp"].get_group()`` (none when ``sp == 1``); feed each rank
       :func:`local_batch` of the global batch.
    2. ``activation_checkpointing``: every decoder layer recomputes its forward in
       backward (see :class:`~longnet.model.LongNetDecoderLayer` for how this meets
       sequence parallelism).
    3. ``compile``: ``torch.compile`` of every decoder layer (``True``, or the name
       of a backend such as ``"aot_eager"``); the sequence-parallel exchange runs
       eagerly between graphs, a checkpointed layer is traced as one region.
    4. FSDP2: ``fully_shard`` of every decoder layer, then of the root, over the
       flattened ``dp x sp`` mesh; ``mp_policy`` is a
       ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. bfloat16 parameters,
       float32 gradient reduction), default full precision.

    Call it on every rank with identically initialized models (same seed); FSDP2
    keeps each rank's shard of the parameters. Build the optimizer afterwards.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not hasattr(model, "decoder") or not hasattr(model, "set_sequence_parallel_group"):
        raise TypeError(f"parallelize expects a longnet LongNetLM, got {type(model).__name__}")
    dp, sp = mesh_shape(mesh)
    model.set_sequence_parallel_group(mesh["sp"].get_group() if sp > 1 else None)
    model.set_activation_checkpointing(activation_checkpointing)
    layers = model.decoder.layers
    if compile:
        backend = {} if compile is True else {"backend": str(compile)}
        for layer in layers:
            layer.compile(**backend)
    fsdp = {
        "mesh": flat_mesh(mesh),
        "mp_policy": mp_policy if mp_policy is not None else MixedPrecisionPolicy(),
    }
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **fsdp)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **fsdp)
    label_collectives(model)
    return model


def local_batch(t: Tensor, mesh, *, uneven_rows: str = "error") -> Tensor:
    """This rank's block of a global ``(B, N, ...)`` batch: rows ``[d*B/dp,
    (d+1)*B/dp)`` and positions ``[s*N/sp, (s+1)*N/sp)`` for mesh coordinates ``(d,
    s)`` (a view, no communication); ``t`` itself when ``mesh`` is None (one process).

    ``uneven_rows``: what a batch whose ``B`` is not divisible by ``dp`` gets:
    ``"error"`` (a ``ValueError``), or ``"whole"``: every ``dp`` rank keeps all its
    rows (e.g. the last, smaller batch of an evaluation, where each ``dp`` rank then
    counts only its own share of the rows, as :func:`evaluate_loss` does).
    """
    if mesh is None:
        return t
    if uneven_rows not in ("error", "whole"):
        raise ValueError(f"uneven_rows must be 'error' or 'whole', got {uneven_rows!r}")
    dp, sp = mesh_shape(mesh)
    if t.dim() < 2:
        raise ValueError(f"the batch must have shape (B, N, ...), got {tuple(t.shape)}")
    b, n = t.shape[0], t.shape[1]
    s, cols = mesh.get_local_rank("sp"), n // sp
    if b % dp and uneven_rows == "whole":
        return t[:, s * cols : (s + 1) * cols]
    if b % dp:
        raise ValueError(f"the global batch size {b} must be divisible by dp = {dp}")
    if n % sp:
        raise ValueError(f"the sequence length {n} must be divisible by sp = {sp}")
    d, rows = mesh.get_local_rank("dp"), b // dp
    return t[d * rows : (d + 1) * rows, s * cols : (s + 1) * cols]


def sum_over_mesh(values: Sequence[float], mesh, what: str = "the loss") -> list[float]:
    """The sums over all ranks of the mesh of per-rank numbers (``values`` themselves
    when ``mesh`` is None: one process). ``what`` names the numbers in
    :func:`~longnet.parallel.current_phase` while the all-reduce runs."""
    if mesh is None:
        return [float(x) for x in values]
    device = (
        "cpu"
        if mesh.device_type == "cpu"
        else torch.device(mesh.device_type, torch.accelerator.current_device_index())
    )
    t = torch.tensor([float(x) for x in values], dtype=torch.float64, device=device)
    with phase(f"the all-reduce of {what} over the mesh"):
        dist.all_reduce(t, group=flat_mesh(mesh).get_group())
    return t.tolist()


def mean_over_mesh(value, mesh) -> float:
    """The mean over all ranks of the mesh of a per-rank number (e.g. the local loss:
    with equal token counts per rank, the global mean loss); ``value`` itself when
    ``mesh`` is None (one process)."""
    if mesh is None:
        return float(value)
    return sum_over_mesh([value], mesh)[0] / dist.get_world_size(flat_mesh(mesh).get_group())


def _own_rows(y: Tensor, rows: int, mesh) -> Tensor:
    """``y`` with the targets of the rows that this ``dp`` rank does not count set to
    ``-100``, for a batch of ``rows`` rows that every ``dp`` rank computes whole
    (``rows`` not divisible by ``dp``): ``dp`` rank ``d`` counts the rows ``[d * rows
    // dp, (d + 1) * rows // dp)``, so every row counts on exactly one ``dp`` rank;
    ``y`` itself when the rows split."""
    if mesh is None:
        return y
    dp = mesh_shape(mesh)[0]
    if rows % dp == 0:
        return y
    d = mesh.get_local_rank("dp")
    owned = y.new_full(y.shape, -100)
    lo, hi = d * rows // dp, (d + 1) * rows // dp
    owned[lo:hi] = y[lo:hi]
    return owned


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    batches,
    mesh=None,
    *,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    return_logits: bool = True,
) -> float:
    """Mean next-token loss (nats per token) of a :class:`~longnet.model.LongNetLM`
    over fixed global batches, over the ranks of ``mesh`` (None: one process).

    The mean is token-weighted over all the batches: every rank sums its per-token
    losses and counts its counted targets (not ``-100``, not the model's padding), and
    the sums and counts are reduced over the mesh, so any mesh gives one process's
    value. A batch is ``(x, y)``, of which every rank computes its
    :func:`local_batch` (a batch whose rows do not split over ``dp`` is computed whole
    on every ``dp`` rank, each counting its own share of the rows), or, on one
    process, packed rows ``(x, y, cu_seqlens)``. ``autocast_dtype``: the forward
    under ``torch.autocast`` to it; ``return_logits=False``: the LM head and loss in
    chunks, no logits. The model is in eval mode during the evaluation and in train
    mode afterwards.
    """
    device_type = torch.device(device).type

    def autocast() -> torch.autocast:
        if autocast_dtype is None:
            return torch.autocast(device_type=device_type, enabled=False)
        return torch.autocast(device_type=device_type, dtype=autocast_dtype)

    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        if len(batch) == 3:  # packed rows with their document boundaries, one process
            x, y, cu = (t.to(device) for t in batch)
            with autocast():
                _, loss = model(x, y, cu_seqlens=cu, return_logits=return_logits)
        else:
            x, y = (local_batch(t, mesh, uneven_rows="whole").to(device) for t in batch)
            y = _own_rows(y, batch[1].shape[0], mesh)
            with autocast():
                _, loss = model(x, y, return_logits=return_logits)
        # The model's loss is the mean over its counted targets (not -100, not padding).
        counted = y != -100 if pad is None else (y != -100) & (y != pad)
        n = int(counted.sum())
        total += float(loss) * n if n else 0.0  # no counted target: the loss is 0 / 0
        count += n
    model.train()
    summed, counted = sum_over_mesh([total, count], mesh, "the validation loss")
    return summed / counted
