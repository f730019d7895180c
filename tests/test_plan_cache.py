"""The sequence-parallel plan cache (longnet.parallel.schedule.plan_rank) is bounded in
bytes: fresh packed documents every batch evict old plans instead of growing it, a
plan planned again after eviction equals the first, and device copies made through
on_device count towards the bound."""

import random

import pytest
import torch
from test_distributed import _random_documents

import longnet.parallel
from longnet.parallel.layout import spanning_documents
from longnet.parallel.schedule import (
    DEFAULT_PLAN_CACHE_BYTES,
    RankPlan,
    on_device,
    plan_cache_info,
    plan_rank,
    set_plan_cache_bytes,
)

WORLD, CHUNK, HEADS, KV_HEADS = 4, 4096, 8, 4
WS = (512, 1024, 2048, 4096, 8192, 16384)
RS = (1, 1, 2, 4, 8, 16)


@pytest.fixture
def cache_bytes():
    """Set the plan cache's bound for one test (an empty cache before and after)."""
    plan_rank.cache_clear()
    previous = set_plan_cache_bytes(DEFAULT_PLAN_CACHE_BYTES)
    yield set_plan_cache_bytes
    set_plan_cache_bytes(previous)
    plan_rank.cache_clear()


def _index_tensors(plan: RankPlan) -> list[torch.Tensor]:
    heads = [c.head_map for c in plan.calls if c.head_map is not None]
    return [plan.kv_index, plan.q_index, *plan.out_index.values(), *plan.lse_index.values()] + (
        heads
    )


def _assert_same_plan(a: RankPlan, b: RankPlan) -> None:
    assert a.pieces == b.pieces and a.cross_patterns == b.cross_patterns
    assert (a.send_rows, a.recv_rows, a.exchange) == (b.send_rows, b.recv_rows, b.exchange)
    assert len(a.calls) == len(b.calls)
    for x, y in zip(a.calls, b.calls):
        assert (x.pattern, x.n_q, x.n_heads, x.n_pairs, x.q_start, x.pieces) == (
            y.pattern,
            y.n_q,
            y.n_heads,
            y.n_pairs,
            y.q_start,
            y.pieces,
        )
        assert (x.head_map is None) == (y.head_map is None)
    assert a.out_index.keys() == b.out_index.keys() == a.lse_index.keys() == b.lse_index.keys()
    ta, tb = _index_tensors(a), _index_tensors(b)
    assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb))


def _args(rnd: random.Random, causal: bool) -> tuple:
    """plan_rank's arguments for one rank of a batch of fresh random documents."""
    cu = _random_documents(rnd, WORLD * CHUNK, max(WS))
    docs = spanning_documents(cu, WORLD, CHUNK)
    return (WORLD, rnd.randrange(WORLD), CHUNK, HEADS, KV_HEADS, WS, RS, causal, 0, docs)


def test_fresh_documents_stay_within_the_bound_and_evicted_plans_plan_again(cache_bytes):
    budget = 2 * 2**20
    cache_bytes(budget)
    rnd = random.Random(31)
    first_args = _args(rnd, True)
    first = plan_rank(*first_args)
    assert first._nbytes >= sum(t.untyped_storage().nbytes() for t in _index_tensors(first))
    for batch in range(200):
        plan_rank(*_args(rnd, batch % 2 == 0))
        info = plan_cache_info()
        assert info.bytes <= budget, (batch, info)
        assert info.bytes == sum(p._nbytes for p in plan_rank._plans.values())
    info = plan_cache_info()
    assert info.evictions > 0 and info.entries < 201, info
    assert info.misses == 201 and info.hits == 0, info  # every batch a new configuration
    assert first_args not in plan_rank._plans
    again = plan_rank(*first_args)
    assert plan_cache_info().misses == 202  # planned again, not found
    assert again is not first
    _assert_same_plan(again, first)
    _assert_same_plan(again, plan_rank.__wrapped__(*first_args))
    assert plan_rank(*first_args) is again and plan_cache_info().hits == 1


def test_a_plan_larger_than_the_bound_is_returned_but_not_kept(cache_bytes):
    rnd = random.Random(7)
    args = _args(rnd, False)
    expected = plan_rank.__wrapped__(*args)
    cache_bytes(1000)
    plan = plan_rank(*args)
    _assert_same_plan(plan, expected)
    info = plan_cache_info()
    assert (info.entries, info.bytes, info.evictions) == (0, 0, 1), info
    cache_bytes(0)  # keeps nothing
    plan_rank(*args)
    assert plan_cache_info().entries == 0


def test_the_defaults_and_keyword_arguments_share_one_entry(cache_bytes):
    a = plan_rank(WORLD, 1, CHUNK, HEADS, KV_HEADS, WS, RS, True)
    b = plan_rank(WORLD, 1, CHUNK, HEADS, KV_HEADS, WS, RS, True, 0, None)
    c = plan_rank(WORLD, 1, CHUNK, HEADS, KV_HEADS, WS, RS, is_causal=True, docs=None)
    assert a is b is c and plan_cache_info().entries == 1
    assert longnet.parallel.plan_cache_info() == plan_cache_info()
    with pytest.raises(ValueError, match="max_bytes"):
        longnet.parallel.set_plan_cache_bytes(-1)
    with pytest.raises(ValueError, match="max_bytes"):
        set_plan_cache_bytes(1.5)  # type: ignore[arg-type]


def test_a_copy_to_the_device_the_plan_is_on_adds_nothing(cache_bytes):
    # On the CPU t.to("cpu") returns t itself: the plan's device cache references the
    # tensor it already holds and no memory is added, so nothing more is counted.
    plan = plan_rank(*_args(random.Random(3), True))
    before = plan_cache_info().bytes
    for t in _index_tensors(plan):
        assert on_device(plan, t, torch.device("cpu")) is t
    assert plan_cache_info().bytes == before == plan._nbytes


def test_device_copies_count_and_evict_the_least_recently_used_plan(cache_bytes, monkeypatch):
    # Without an accelerator, Tensor.to stands in for a copy to one: a new storage of
    # the same bytes (what a copy to a GPU allocates there), so on_device counts it.
    rnd = random.Random(5)
    args_a, args_b = _args(rnd, True), _args(rnd, False)
    a, b = plan_rank(*args_a), plan_rank(*args_b)
    host_a, host_b = a._nbytes, b._nbytes
    tensors = [t for t in _index_tensors(a) if t.numel()]
    copied = sum(t.untyped_storage().nbytes() for t in tensors)
    assert copied > 0
    cache_bytes(host_a + host_b + copied - 1)  # a's copies push b out
    assert plan_rank(*args_a) is a  # a is now the most recently used
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *_, **__: self.clone())
    for t in tensors:
        copy = on_device(a, t, torch.device("cpu"))
        assert copy is not t and torch.equal(copy, t)
        assert on_device(a, t, torch.device("cpu")) is copy  # copied once
    monkeypatch.undo()
    info = plan_cache_info()
    assert a._nbytes == host_a + copied
    assert (info.entries, info.bytes, info.evictions) == (1, host_a + copied, 1), info
    assert args_b not in plan_rank._plans and plan_rank._plans[args_a] is a


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_copies_to_a_cuda_device_count(cache_bytes):
    plan = plan_rank(*_args(random.Random(11), True))
    before = plan_cache_info().bytes
    tensors = [t for t in _index_tensors(plan) if t.numel()]
    for t in tensors:
        assert on_device(plan, t, torch.device("cuda")).is_cuda
    copied = sum(t.untyped_storage().nbytes() for t in tensors)
    assert plan_cache_info().bytes == before + copied == plan._nbytes
