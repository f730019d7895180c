"""Data x sequence parallelism of LongNet over ``torch.distributed``.

* Sequence-parallel dilated attention (LongNet section 3.1):
  :func:`sequence_parallel_dilated_attention` (:mod:`.attention`), planned per rank
  (:mod:`.schedule`) from the segment geometry it shares with ``longnet.plan``
  (:mod:`.layout`), over autograd-aware collectives with timeouts and traffic
  counters (:mod:`.collectives`: :func:`split_sequence`, :func:`gather_sequence`,
  :func:`comm_stats`, :func:`set_timeout`, ...). Plans are cached in at most
  :func:`set_plan_cache_bytes` bytes (:func:`plan_cache_info`).
* Training on a ``("dp", "sp")`` device mesh: :class:`ParallelDims` (the degrees,
  validated once; :mod:`.dims`), :func:`init_process_group` under ``torchrun``
  (:mod:`.launch`), :func:`build_mesh` and :func:`parallelize` (:mod:`.mesh`), the
  names of the collectives a rank is in (:mod:`.phases`) and sharded checkpoints
  (:mod:`.checkpoint`, also ``python -m longnet.parallel.checkpoint``).
"""

from typing import TYPE_CHECKING, Any

from longnet.parallel.attention import sequence_parallel_dilated_attention
from longnet.parallel.collectives import (
    CommStats,
    comm_stats,
    gather_sequence,
    get_timeout,
    reset_comm_stats,
    set_backward_overlap,
    set_timeout,
    split_sequence,
)
from longnet.parallel.dims import MESH_DIMS, ParallelDims, add_parallel_arguments
from longnet.parallel.launch import (
    close_process_group,
    init_mesh,
    init_process_group,
    is_launched,
    launched_world_size,
    local_device,
    restart_count,
)
from longnet.parallel.mesh import (
    build_mesh,
    evaluate_loss,
    flat_mesh,
    local_batch,
    local_packed_batch,
    mean_over_mesh,
    mesh_shape,
    parallelize,
    seed_rank,
    sum_over_mesh,
    token_mean_loss,
)
from longnet.parallel.phases import current_phase, label_collectives, phase
from longnet.parallel.schedule import PlanCacheInfo, plan_cache_info, set_plan_cache_bytes

if TYPE_CHECKING:
    from longnet.parallel.checkpoint import (
        CheckpointManager,
        checkpoint_config,
        checkpoint_step,
        export_pretrained,
        latest_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )

# The checkpoint functions load on first use, so that ``python -m
# longnet.parallel.checkpoint`` runs a module that the package has not imported yet.
_CHECKPOINT_NAMES = (
    "CheckpointManager",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "checkpoint_step",
    "checkpoint_config",
    "export_pretrained",
)


def __getattr__(name: str) -> Any:
    if name in _CHECKPOINT_NAMES:
        from longnet.parallel import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'longnet.parallel' has no attribute {name!r}")


__all__ = [
    # sequence-parallel attention
    "sequence_parallel_dilated_attention",
    "split_sequence",
    "gather_sequence",
    "comm_stats",
    "reset_comm_stats",
    "CommStats",
    "set_timeout",
    "get_timeout",
    "set_backward_overlap",
    "set_plan_cache_bytes",
    "plan_cache_info",
    "PlanCacheInfo",
    # the mesh and training
    "MESH_DIMS",
    "ParallelDims",
    "add_parallel_arguments",
    "is_launched",
    "launched_world_size",
    "restart_count",
    "local_device",
    "init_process_group",
    "init_mesh",
    "close_process_group",
    "build_mesh",
    "mesh_shape",
    "flat_mesh",
    "parallelize",
    "local_batch",
    "local_packed_batch",
    "mean_over_mesh",
    "sum_over_mesh",
    "token_mean_loss",
    "seed_rank",
    "evaluate_loss",
    "current_phase",
    "phase",
    "label_collectives",
    # checkpoints (loaded on first use)
    "CheckpointManager",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "checkpoint_step",
    "checkpoint_config",
    "export_pretrained",
]
