"""Collectives with timeouts, traffic counters and autograd for sequence parallelism.

Every exchange of the sequence-parallel path goes through :func:`all_to_all`, an
autograd-aware wrapper of ``torch.distributed.all_to_all_single`` (forward: the
exchange; backward: the same exchange with send and receive sizes swapped). It
counts the bytes each rank sends and receives (:func:`comm_stats`) and waits on the
collective with a timeout (:func:`set_timeout`), so a rank that died or never
arrives turns into a ``RuntimeError`` on the others instead of a hang.
:func:`split_sequence` and :func:`gather_sequence` cut a sequence into the ranks'
chunks and put it back together (differentiably).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CommStats",
    "comm_stats",
    "reset_comm_stats",
    "set_timeout",
    "get_timeout",
    "all_to_all",
    "all_to_all_start",
    "Pending",
    "all_gather_small",
    "group_rank_and_size",
    "set_backward_overlap",
    "split_sequence",
    "gather_sequence",
]

_DEFAULT_TIMEOUT_S = float(os.environ.get("LONGNET_DIST_TIMEOUT", "600"))
_timeout_s: float = _DEFAULT_TIMEOUT_S


@dataclass
class CommStats:
    """Bytes this rank passed to the sequence-parallel collectives.

    ``bytes_sent`` / ``bytes_received`` count what leaves / reaches this rank
    (data a rank keeps for itself is not counted), forward and backward together;
    ``calls`` counts the collectives issued.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0

    def __repr__(self) -> str:
        return (
            f"CommStats(bytes_sent={self.bytes_sent}, "
            f"bytes_received={self.bytes_received}, calls={self.calls})"
        )


_stats = CommStats()


def comm_stats() -> CommStats:
    """A copy of this process's traffic counters since the last reset."""
    return CommStats(_stats.bytes_sent, _stats.bytes_received, _stats.calls)


def reset_comm_stats() -> None:
    """Set this process's traffic counters back to zero."""
    _stats.bytes_sent = _stats.bytes_received = _stats.calls = 0


def set_timeout(seconds: float) -> None:
    """Seconds a rank waits for any one collective before it raises (default 600,
    or the ``LONGNET_DIST_TIMEOUT`` environment variable)."""
    seconds = float(seconds)
    if not seconds > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {seconds}")
    global _timeout_s
    _timeout_s = seconds


def get_timeout() -> float:
    """The collective timeout in seconds (see :func:`set_timeout`)."""
    return _timeout_s


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple:
    """``(rank, world_size)`` of this process inside ``group`` (default: WORLD)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "longnet.parallel needs an initialized default process group: call "
            "torch.distributed.init_process_group(...) first"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError("this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def _wait(work, what: str, group) -> None:
    """Wait for an async collective, turning failures and timeouts into clear errors."""
    try:
        ok = work.wait(timeout=datetime.timedelta(seconds=_timeout_s))
    except Exception as exc:  # gloo raises on timeout or on a peer that went away
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        raise RuntimeError(
            f"longnet.parallel: {what} failed on rank {rank} of {size} "
            f"(timeout {_timeout_s:g} s): {exc}. Another rank probably died, hung, or "
            "called with a different configuration or call order."
        ) from exc
    if ok is False:  # some backends report a timeout by returning False
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        raise RuntimeError(
            f"longnet.parallel: {what} timed out after {_timeout_s:g} s on rank "
            f"{rank} of {size}; another rank probably died or hung."
        )


def _launch(x: Tensor, send_sizes: Sequence[int], recv_sizes: Sequence[int], group):
    """Start a variable-size all-to-all of a flat tensor (no autograd), counted."""
    x = x.contiguous()
    out = x.new_empty(int(sum(recv_sizes)))
    rank = dist.get_rank(group)
    item = x.element_size()
    _stats.bytes_sent += item * sum(s for d, s in enumerate(send_sizes) if d != rank)
    _stats.bytes_received += item * sum(s for d, s in enumerate(recv_sizes) if d != rank)
    _stats.calls += 1
    work = dist.all_to_all_single(
        out, x, list(map(int, recv_sizes)), list(map(int, send_sizes)), group=group, async_op=True
    )
    return out, (work, x)


_overlap_backward = True


def set_backward_overlap(enabled: bool) -> None:
    """Whether the backward of an exchange starts as soon as the gradient of what it
    received is complete, so that the autograd work created before the exchange's
    arrival (the local patterns) runs while it is in flight (default on), or waits
    where the exchange began (off, for comparison)."""
    global _overlap_backward
    _overlap_backward = bool(enabled)


class Pending:
    """An all-to-all in flight: call :meth:`wait` before reading its output, then
    read it through :meth:`arrived`."""

    def __init__(self, work, what: str, group, link=None, sizes=None, free_sent=False):
        # work is (collective handle, send buffer): the buffer must live until done.
        self._work, self._what, self._group = work, what, group
        self._link, self._sizes = link, sizes
        self._free_sent = free_sent

    def wait(self) -> None:
        if self._work is not None:
            (work, sent), self._work = self._work, None
            _wait(work, self._what, self._group)
            if self._free_sent:
                # The backend's worker thread can hold the finished collective, and
                # with it the send buffer, a while longer: free its memory here, now
                # that it was sent (a buffer only this exchange uses).
                sent.untyped_storage().resize_(0)

    def arrived(self, out: Tensor) -> Tensor:
        """``out`` (the exchange's output, after :meth:`wait`) marked as arrived: in
        backward the reverse exchange starts at this point of the graph and the
        exchange's own backward only waits for it; work between the two (what ran
        while the forward exchange was in flight) overlaps it."""
        if self._link is None or not out.requires_grad:
            return out
        return _Arrive.apply(out, self._link, self._sizes, self._group, self._what)

    def __repr__(self) -> str:
        return f"Pending({self._what!r}, done={self._work is None})"


class _AllToAll(torch.autograd.Function):
    """All-to-all of a flat tensor; its backward is the reverse all-to-all.

    The forward only starts the exchange and puts a :class:`Pending` into ``box``;
    the caller waits on it before it reads the output (so local work can overlap
    the transfer). The backward waits before it returns."""

    @staticmethod
    def forward(ctx, x, send_sizes, recv_sizes, group, what, box, free_sent):
        ctx.sizes = (send_sizes, recv_sizes)
        ctx.group = group
        ctx.what = what
        out, work = _launch(x, send_sizes, recv_sizes, group)
        ctx.link = {}
        box.append(Pending(work, what, group, ctx.link, ctx.sizes, free_sent))
        return out

    @staticmethod
    def backward(ctx, grad):
        send_sizes, recv_sizes = ctx.sizes
        started = ctx.link.pop("backward", None)  # launched by _Arrive's backward
        if started is None:
            started = _launch(grad, recv_sizes, send_sizes, ctx.group)
        g, (work, _buf) = started
        _wait(work, ctx.what + " (backward)", ctx.group)
        return g, None, None, None, None, None, None


class _Arrive(torch.autograd.Function):
    """Identity on an exchange's output whose backward starts the reverse exchange
    (see :meth:`Pending.arrived`)."""

    @staticmethod
    def forward(ctx, out, link, sizes, group, what):
        ctx.link, ctx.sizes, ctx.group = link, sizes, group
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        if _overlap_backward:
            send_sizes, recv_sizes = ctx.sizes
            ctx.link["backward"] = _launch(grad, recv_sizes, send_sizes, ctx.group)
        return grad, None, None, None, None


def all_to_all_start(
    x: Tensor,
    send_sizes: Sequence[int],
    recv_sizes: Sequence[int],
    group=None,
    what: str = "all_to_all",
    free_sent: bool = False,
) -> tuple[Tensor, Pending]:
    """Start sending ``x[sum(send_sizes[:d]) : ...]`` to rank ``d`` of ``group``.

    Returns ``(out, pending)``: ``out`` becomes the concatenation of what every rank
    sent here (``recv_sizes[s]`` elements from rank ``s``) once ``pending.wait()``
    returned. ``x`` is 1-D. Differentiable (the backward exchange is synchronous);
    every rank of ``group`` must call it. ``free_sent=True`` frees the memory of the
    send buffer (``x``, or its contiguous copy) in ``pending.wait()``: only for an
    ``x`` that nothing reads afterwards."""
    if x.dim() != 1:
        raise ValueError(f"all_to_all expects a 1-D tensor, got shape {tuple(x.shape)}")
    if sum(send_sizes) != x.numel():
        raise ValueError(f"send_sizes sum to {sum(send_sizes)} but x has {x.numel()} elements")
    box: list[Pending] = []
    out = _AllToAll.apply(x, tuple(send_sizes), tuple(recv_sizes), group, what, box, free_sent)
    return out, box[0]


def all_to_all(
    x: Tensor,
    send_sizes: Sequence[int],
    recv_sizes: Sequence[int],
    group=None,
    what: str = "all_to_all",
) -> Tensor:
    """:func:`all_to_all_start` followed by the wait."""
    out, pending = all_to_all_start(x, send_sizes, recv_sizes, group, what)
    pending.wait()
    return out


def all_gather_small(t: Tensor, group=None, what: str = "all_gather") -> list[Tensor]:
    """All-gather of a small tensor (no autograd, not counted), with the timeout."""
    size = dist.get_world_size(group)
    out = [torch.empty_like(t) for _ in range(size)]
    work = dist.all_gather(out, t.contiguous(), group=group, async_op=True)
    _wait(work, what, group)
    return out


def split_sequence(x: Tensor, group: dist.ProcessGroup | None = None, dim: int = 1) -> Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim`` (a view, no communication).

    ``x.shape[dim]`` must be a multiple of the group size; rank ``p`` gets
    ``[p*L, (p+1)*L)``. Gradients reach only this rank's part of ``x``.
    """
    rank, world = group_rank_and_size(group)
    n = x.shape[dim]
    if n % world != 0:
        raise ValueError(f"x.shape[{dim}] = {n} must be a multiple of the group size {world}")
    chunk = n // world
    return x.narrow(dim, rank * chunk, chunk)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        rank, world = group_rank_and_size(group)
        xt = x.movedim(dim, 0).contiguous()
        n = xt.numel()
        got = all_to_all(
            xt.reshape(-1).repeat(world), [n] * world, [n] * world, group, "gather_sequence"
        )
        got = got.view(world * xt.shape[0], *xt.shape[1:])
        return got.movedim(0, dim).contiguous()

    @staticmethod
    def backward(ctx, grad):
        # Sum over ranks of the gradient of this rank's chunk (a reduce-scatter).
        rank, world = group_rank_and_size(ctx.group)
        gt = grad.movedim(ctx.dim, 0).contiguous()
        chunk = gt.shape[0] // world
        n = gt.numel() // world
        got = all_to_all(
            gt.reshape(-1), [n] * world, [n] * world, ctx.group, "gather_sequence (backward)"
        )
        summed = got.view(world, chunk, *gt.shape[1:]).sum(dim=0)
        return summed.movedim(0, ctx.dim), None, None


def gather_sequence(x: Tensor, group: dist.ProcessGroup | None = None, dim: int = 1) -> Tensor:
    """Concatenate every rank's chunk along ``dim`` (the inverse of :func:`split_sequence`).

    Differentiable: the gradient of this rank's chunk is the sum over ranks of the
    gradients of the gathered tensor's slice ``[p*L, (p+1)*L)`` (a reduce-scatter),
    i.e. the gradient of the sum of all ranks' losses.
    """
    group_rank_and_size(group)
    return _Gather.apply(x, group, dim)
