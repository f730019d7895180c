"""Joining the job that ``torchrun`` started: the world size it announces, the process
group (gloo on CPUs, NCCL on GPUs) with one timeout for every collective, a fresh
store after an elastic restart, and the teardown."""

from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from longnet.parallel.collectives import set_timeout

if TYPE_CHECKING:
    from longnet.parallel.dims import ParallelDims

__all__ = [
    "is_launched",
    "launched_world_size",
    "restart_count",
    "local_device",
    "init_process_group",
    "init_mesh",
    "close_process_group",
]


def is_launched() -> bool:
    """Whether this process was started by ``torchrun`` (``RANK`` and ``WORLD_SIZE``
    are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_world_size() -> int:
    """The number of processes ``torchrun`` started (1 outside ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if is_launched() else 1


def restart_count() -> int:
    """How often ``torchrun --max-restarts`` restarted the job (0 on the first run)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def local_device(device: str) -> str:
    """``"cuda"`` as this process's GPU (``cuda:LOCAL_RANK``); any other device as is."""
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def _restart_store(timeout: datetime.timedelta) -> dict:
    """After a ``torchrun`` restart the store still holds the previous attempt's
    addresses under the same keys: this attempt's store, with its own key prefix."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not agent and rank == 0,
        timeout=timeout,
    )
    return {
        "store": dist.PrefixStore(f"longnet-restart-{restart_count()}", base),
        "rank": rank,
        "world_size": world,
    }


def init_process_group(device: str = "cpu", *, timeout: float = 600.0) -> None:
    """Join the job ``torchrun`` started: the default process group over NCCL when
    ``device`` is a CUDA device (this process's GPU, ``LOCAL_RANK``, becomes the
    current one), over gloo otherwise. ``timeout`` (seconds) bounds the process
    group's operations and every sequence-parallel collective
    (:func:`~longnet.parallel.set_timeout`)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    td = datetime.timedelta(seconds=timeout)
    store = _restart_store(td) if restart_count() else {}
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=td, **store)
    set_timeout(timeout)


def init_mesh(dims: ParallelDims, device: str = "cpu", *, timeout: float = 600.0):
    """The ``("dp", "sp")`` mesh of ``dims`` over the job ``torchrun`` started
    (:func:`init_process_group` on ``device`` with ``timeout``, then
    :meth:`ParallelDims.build_mesh <longnet.parallel.dims.ParallelDims.build_mesh>`),
    or None when ``dims`` has one rank (nothing to join)."""
    if not dims.enabled:
        return None
    init_process_group(device, timeout=timeout)
    return dims.build_mesh("cuda" if device.startswith("cuda") else "cpu")


def close_process_group() -> None:
    """Wait for every rank (none tears down while a peer still communicates), then
    destroy the default process group."""
    dist.barrier()
    dist.destroy_process_group()
