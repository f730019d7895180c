"""Data x sequence parallel training of a :class:`~longnet.model.LongNetLM` on a
``DeviceMesh`` with dimensions ``("dp", "sp")``, with PyTorch's own tools.

* :func:`build_mesh`: the 2-D mesh from ``(dp, sp)``, with clear errors.
* :func:`parallelize`: applies every parallelism to a plain model, in torchtitan's
  order: sequence parallelism (every attention layer's group is ``mesh["sp"]``),
  per-layer activation checkpointing, per-layer ``torch.compile``, then FSDP2
  ``fully_shard`` of every decoder layer and of the root over the flattened
  ``dp x sp`` mesh (mixed precision through FSDP2's ``MixedPrecisionPolicy``).
* :func:`local_batch`, :func:`local_packed_batch`, :func:`mean_over_mesh`,
  :func:`sum_over_mesh`: this rank's block of a global batch (of packed rows), and
  the mean or sum of per-rank numbers;
  :func:`token_mean_loss`: a training step's loss, the token-weighted mean over the
  whole global batch; :func:`evaluate_loss`: a model's mean loss over batches, over
  the mesh.
* :func:`seed_rank`: this rank's generators seeded from the run's seed and the
  rank's mesh coordinates (dropout masks differ across shards and rows).

The degrees are validated once by :class:`~longnet.parallel.dims.ParallelDims`,
which :func:`build_mesh` uses.

Why the parameters are sharded over ``dp x sp`` and not over ``dp`` alone: the
sequence-parallel ranks of one ``dp`` row hold the same parameters and each computes
a part of their gradient (the attention backward sends every rank the gradient of
the rows it sent), so gradients must be reduced over both dimensions; one
reduce-scatter over the flattened mesh does that and leaves each rank ``1 / (dp *
sp)`` of the parameters, gradients and optimizer state. FSDP2 averages the
gradients over the ``dp * sp`` ranks. A rank's own mean loss (``model(x, y)``) gives
the gradient of the global mean only when every rank holds the same number of
counted targets; :func:`token_mean_loss` gives it for any counts (ignored targets,
padding, a shard without any counted target): every rank's loss is its sum of
per-token losses times ``dp * sp`` over the global count of counted targets.

Example (under ``torchrun --nproc_per_node 4``)::

    dist.init_process_group("gloo")
    mesh = build_mesh(dp=2, sp=2, seq_len=4096)
    model = parallelize(LongNetLM(config), mesh, activation_checkpointing=True)
    seed_rank(0, mesh)  # dropout masks of their own on every rank
    x, y = local_batch(x_global, mesh), local_batch(y_global, mesh)
    loss, value = token_mean_loss(model, x, y, mesh)  # value: the global mean loss
    loss.backward()
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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
    "local_packed_batch",
    "mean_over_mesh",
    "sum_over_mesh",
    "flat_mesh",
    "token_mean_loss",
    "seed_rank",
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


def local_packed_batch(rows: Any, index: Sequence[int], mesh) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's part of the packed global batch of rows ``index`` of ``rows`` (a
    :class:`longnet.data.PackedRows`): ``(inputs, targets, cu_seqlens)``.

    ``dp`` rank ``d`` joins the rows ``index[d * k // dp : (d + 1) * k // dp]`` (``k =
    len(index)``) into one packed row (:func:`longnet.data.packed_batch`; a row
    boundary is a document boundary) and keeps the positions ``[s * n / sp, (s + 1) *
    n / sp)`` of it; ``cu_seqlens`` are the boundaries of the whole packed row, as
    sequence parallelism takes them, so a document may cross ``sp`` ranks. A ``dp``
    rank without rows (``k < dp``, e.g. the last validation batch) gets one row of
    ignored targets, so that every rank runs the same forwards (FSDP2 gathers the
    parameters in each). ``mesh=None``: ``packed_batch(rows, index)``. With
    :func:`token_mean_loss` the loss is one process's on the whole packed batch,
    whatever split the mesh makes.
    """
    from longnet.data import packed_batch

    if mesh is None:
        return packed_batch(rows, index)
    dp, sp = mesh_shape(mesh)
    d, s = mesh.get_local_rank("dp"), mesh.get_local_rank("sp")
    index = [int(i) for i in index]
    mine = index[d * len(index) // dp : (d + 1) * len(index) // dp]
    if mine:
        x, y, cu = packed_batch(rows, mine)
    else:
        n = rows.inputs.shape[1]
        x = rows.inputs.new_zeros((1, n))
        y = rows.targets.new_full((1, n), -100)
        cu = torch.tensor([0, n], dtype=torch.int64)
    n = x.shape[1]
    if n % sp:
        raise ValueError(f"the packed row length {n} must be divisible by sp = {sp}")
    cols = n // sp
    return x[:, s * cols : (s + 1) * cols], y[:, s * cols : (s + 1) * cols], cu


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


def token_mean_loss(
    model: LongNetLM, x: Tensor, y: Tensor, mesh=None, **forward_kwargs: Any
) -> tuple[Tensor, float]:
    """One training step's loss: ``(loss, value)``, where ``value`` is the mean
    next-token loss over every counted target of the global batch (a float, the same
    on every rank; NaN when no target of the global batch counts) and ``loss`` the
    tensor to backpropagate on this rank.

    ``x``, ``y`` are this rank's block (:func:`local_batch`) of a
    :class:`~longnet.model.LongNetLM`'s batch; ``forward_kwargs`` go to the model
    (``return_logits``, ``cu_seqlens``). Every rank computes the sum of its per-token
    losses (``reduction="sum"``) and counts its counted targets (not ``-100``, not
    the padding id); one all-reduce over the ``dp x sp`` ranks gives the global sum
    and count. ``loss`` is the local sum times ``dp * sp`` over the global count:
    after FSDP2's average over the ``dp * sp`` ranks (:func:`parallelize`) the
    gradient is that of the global token mean, whatever split of rows and positions
    the mesh makes, including ranks whose targets are all ignored (their sum is 0,
    not 0 / 0). With ``mesh=None`` (one process) ``loss`` is the mean itself (0 when
    no target counts). Collective under a mesh: every rank calls it.
    """
    _, local = model(x, y, reduction="sum", **forward_kwargs)
    total, count = sum_over_mesh(
        [float(local.detach()), int(model.count_targets(y))], mesh, "the loss sum and target count"
    )
    world = 1 if mesh is None else dist.get_world_size(flat_mesh(mesh).get_group())
    loss = local * (world / max(count, 1.0))
    return loss, (total / count if count else float("nan"))


def seed_rank(seed: int, mesh=None, *, step: int = 0) -> int:
    """Seed this rank's generators (``torch.manual_seed``: the CPU one and every
    accelerator's) with a seed derived from ``seed``, ``step`` and the rank's mesh
    coordinates ``(d, s)`` (``(0, 0)`` for ``mesh=None``: one process); return it.

    Call it after building the model from the shared seed (the same initial
    parameters on every rank): from then on every ``dp`` row and every ``sp`` shard
    draws dropout masks of its own, instead of every rank drawing the same ones. The
    draws of a rank are a function of ``(seed, step, d, s)``: a run is reproducible
    on the same mesh, while on a mesh of another shape the dropout masks differ
    (another split of the rows and positions draws other masks), so with dropout > 0
    the losses depend on the mesh. ``step``: a resume whose generator states cannot
    be restored (another mesh) seeds with its step, so it does not repeat the masks
    of the run's start.
    """
    d, s = (0, 0) if mesh is None else (mesh.get_local_rank("dp"), mesh.get_local_rank("sp"))
    digest = hashlib.sha256(f"longnet-rank-seed/{seed}/{step}/{d}/{s}".encode()).digest()
    derived = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    torch.manual_seed(derived)
    return derived


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
    model: LongNetLM,
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
    on every ``dp`` rank, each counting its own share of the rows), or packed rows
    ``(x, y, cu_seqlens)``: this rank's own part (:func:`local_packed_batch`; on one
    process the whole batch). ``autocast_dtype``: the forward
    under ``torch.autocast`` to it; ``return_logits=False``: the LM head and loss in
    chunks, no logits. The model is in eval mode during the evaluation and in train
    mode afterwards.
    """
    device_type = torch.device(device).type

    def autocast() -> torch.autocast:
        if autocast_dtype is None:
            return torch.autocast(device_type=device_type, enabled=False)
        return torch.autocast(device_type=device_type, dtype=autocast_dtype)

    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        if len(batch) == 3:  # this rank's packed rows with their document boundaries
            x, y, cu = (t.to(device) for t in batch)
            with autocast():
                _, loss = model(x, y, cu_seqlens=cu, return_logits=return_logits, reduction="sum")
        else:
            x, y = (local_batch(t, mesh, uneven_rows="whole").to(device) for t in batch)
            y = _own_rows(y, batch[1].shape[0], mesh)
            with autocast():
                _, loss = model(x, y, return_logits=return_logits, reduction="sum")
        # The sum over the counted targets (not -100, not padding): 0 when none counts.
        total += float(loss)
        count += int(model.count_targets(y))
    model.train()
    summed, counted = sum_over_mesh([total, count], mesh, "the validation loss")
    return summed / counted
