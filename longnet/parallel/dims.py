"""The degrees of data x sequence parallelism of a job, validated once.

:class:`ParallelDims` holds ``dp`` (the sequences of a global batch are split over
it) and ``sp`` (every sequence is split over it) for a world of ``dp * sp`` ranks,
checks them when it is made, and builds the ``("dp", "sp")`` device mesh::

    dims = ParallelDims.from_launch(dp=None, sp=2)   # dp from torchrun's world size
    dims.check_batch(batch_size=8, seq_len=4096)
    init_process_group("cpu")
    mesh = dims.build_mesh("cpu")
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch.distributed as dist

from longnet.parallel.launch import launched_world_size

__all__ = ["MESH_DIMS", "ParallelDims", "add_parallel_arguments"]

MESH_DIMS = ("dp", "sp")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class ParallelDims:
    """Data-parallel degree ``dp`` and sequence-parallel degree ``sp`` of a world of
    ``world_size`` ranks.

    Raises (when made):
        ValueError: ``dp``, ``sp`` or ``world_size`` not an int >= 1.
        RuntimeError: ``dp * sp != world_size``; the message names the degrees that
            fit the world.
    """

    dp: int
    sp: int
    world_size: int

    def __post_init__(self) -> None:
        dp, sp = _positive_int("dp", self.dp), _positive_int("sp", self.sp)
        world = _positive_int("world_size", self.world_size)
        if dp * sp == world:
            return
        ranks = f"{world} rank" + ("s" if world > 1 else "")
        fix = (
            f" (e.g. --dp {world // sp if world % sp == 0 else 1} "
            f"--sp {sp if world % sp == 0 else world})"
            if world > 1
            else ""
        )
        launch = (
            f" (data and sequence parallelism run under torchrun, e.g. "
            f"torchrun --nproc_per_node={dp * sp} ... --dp {dp} --sp {sp})"
            if world == 1
            else ""
        )
        raise RuntimeError(
            f"the world has {ranks} but dp x sp = {dp} x {sp} = {dp * sp}: choose dp and "
            f"sp with dp * sp = {world}{fix}, or start {dp * sp} processes{launch}"
        )

    @classmethod
    def from_launch(
        cls,
        dp: int | None = None,
        sp: int | None = None,
        *,
        sequence_parallel: bool = False,
        world_size: int | None = None,
    ) -> ParallelDims:
        """The degrees of a job of ``world_size`` processes (default: those
        ``torchrun`` started, 1 outside it): ``sp`` default 1 (every rank when
        ``sequence_parallel``), ``dp`` default ``world_size / sp``.

        Raises:
            ValueError: ``sequence_parallel`` with a ``dp`` other than 1 or an ``sp``
                other than the world size, or on one process.
            RuntimeError, ValueError: as the class.
        """
        world = launched_world_size() if world_size is None else world_size
        if sequence_parallel:
            if sp not in (None, world) or dp not in (None, 1):
                raise ValueError(
                    f"sequence parallelism over all ranks means dp 1 and sp {world} "
                    f"(--dp 1 --sp {world}); got dp {dp}, sp {sp}"
                )
            if world == 1:
                raise ValueError(
                    "sequence parallelism over all ranks needs several processes: run "
                    "under torchrun, e.g. torchrun --nproc_per_node=2 ... --sequence-parallel"
                )
            sp = world
        sp = 1 if sp is None else sp
        if dp is None:
            dp = max(1, world // sp) if isinstance(sp, int) and sp > 0 else 1
        return cls(dp, sp, world)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ParallelDims:
        """:meth:`from_launch` of the flags :func:`add_parallel_arguments` adds."""
        return cls.from_launch(args.dp, args.sp, sequence_parallel=args.sequence_parallel)

    @property
    def enabled(self) -> bool:
        """Whether there is more than one rank (else nothing is distributed)."""
        return self.world_size > 1

    def check_batch(self, batch_size: int | None = None, seq_len: int | None = None) -> None:
        """Raise a ``ValueError`` unless ``dp`` divides the global ``batch_size`` and
        ``sp`` divides ``seq_len`` (either may be None: not checked)."""
        if batch_size is not None and batch_size % self.dp:
            raise ValueError(
                f"the global batch size {batch_size} must be divisible by dp = {self.dp}"
            )
        if seq_len is not None and seq_len % self.sp:
            raise ValueError(
                f"the sequence length {seq_len} must be divisible by sp = {self.sp} (every "
                f"sequence-parallel rank holds seq_len / sp positions)"
            )

    def build_mesh(self, device_type: str | None = None):
        """The ``DeviceMesh`` of shape ``(dp, sp)`` named ``("dp", "sp")`` over the
        default process group, which must have ``world_size`` ranks.

        Rank ``r`` sits at ``(r // sp, r % sp)``: the ``sp`` ranks of one sequence are
        consecutive (on one machine when ``sp`` divides the GPUs per machine).
        ``device_type``: ``"cpu"`` or ``"cuda"``; default ``"cuda"`` if the default
        process group's backend is NCCL, else ``"cpu"``.
        """
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "building the mesh needs an initialized default process group: run under "
                "torchrun and call torch.distributed.init_process_group() first"
            )
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(
                f"the process group has {dist.get_world_size()} ranks, but these degrees "
                f"are for a world of {self.world_size} (dp {self.dp} x sp {self.sp})"
            )
        if device_type is None:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        return init_device_mesh(device_type, (self.dp, self.sp), mesh_dim_names=MESH_DIMS)


def add_parallel_arguments(group) -> None:
    """Add ``--dp``, ``--sp``, ``--sequence-parallel`` (read by
    :meth:`ParallelDims.from_args`) and ``--timeout`` (seconds, for
    :func:`~longnet.parallel.init_mesh`) to an ``argparse`` parser or argument group."""
    group.add_argument(
        "--dp",
        type=int,
        help="under torchrun: data-parallel degree (the global --batch-size is "
        "split over it); default WORLD / sp",
    )
    group.add_argument(
        "--sp",
        type=int,
        help="under torchrun: sequence-parallel degree (every sequence is split "
        "over it); default 1",
    )
    group.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="under torchrun: split every sequence across all ranks (--sp WORLD)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="under torchrun: seconds a rank waits for any collective before it "
        "fails, naming the collective (a dead or hung rank)",
    )
