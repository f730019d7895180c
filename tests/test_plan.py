"""longnet.plan against the sequence-parallel planner and against real gloo runs.

The gloo runs reuse tests/test_distributed.py's spawning (``_spawn`` with
``"test_plan:<function>"`` scenarios): every rank runs each configuration forward and
backward and reports what ``comm_stats()`` counted and the bytes of the tensors
autograd keeps for backward (distinct storages, read after the forward).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import random
import subprocess
import sys
import weakref

import pytest
import torch
from test_distributed import _random_documents, _spawn, random_patterns

from longnet.plan import geometric_patterns, parse_count, plan_run, scaling_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, batch, L, H, Hk, D, segment_lengths, dilation_rates, causal, dtype)
CASES = [
    ("cross", 1, 16, 4, 4, 8, [8, 16, 32], [1, 2, 4], False, "float32"),
    ("cross-causal", 1, 16, 4, 4, 8, [8, 16, 32], [1, 2, 4], True, "float32"),
    ("gqa-partial", 2, 12, 6, 2, 8, [5, 24], [2, 3], False, "float32"),
    ("gqa-partial-causal-bf16", 2, 12, 6, 2, 8, [5, 24], [2, 3], True, "bfloat16"),
    ("mqa-partial-local", 1, 12, 4, 1, 8, [5, 9], [1, 2], True, "float32"),
    ("longer-than-sequence", 1, 8, 4, 2, 8, [4, 64], [1, 8], False, "float32"),
    ("all-local", 1, 16, 2, 2, 8, [4, 8], [1, 2], True, "float32"),
    ("offset-gqa-causal", 1, 12, 6, 2, 8, [5, 24], [2, 3], True, "float32"),
    # Large enough that activations dominate everything else a process holds.
    ("memory", 1, 2048, 4, 2, 32, [512, 1536, 8192], [1, 2, 4], True, "float32"),
    ("docs-cross", 1, 16, 4, 4, 8, [8, 16, 32], [1, 2, 4], False, "float32"),
    ("docs-gqa-causal-bf16", 1, 12, 6, 2, 8, [5, 24], [2, 3], True, "bfloat16"),
    ("docs-offset-causal", 1, 12, 4, 2, 8, [4, 8, 16], [1, 2, 4], True, "float32"),
    ("docs-memory", 1, 2048, 4, 2, 32, [512, 1536, 8192], [1, 2, 4], True, "float32"),
]
# position_offset of the whole sequence (0 for the others)
OFFSETS = {"offset-gqa-causal": 7, "docs-offset-causal": 3}
# Packed documents: lengths repeated in order to fill the row (longnet.plan.document_lengths)
DOCS = {
    "docs-cross": [5, 0, 23, 3, 40],
    "docs-gqa-causal-bf16": [7, 30, 2, 0, 13],
    "docs-offset-causal": [1, 2, 9, 17],
    "docs-memory": [3000, 700, 5000, 100, 1200],
}
LARGE = ("memory", "docs-memory")  # no count matrices of these


def _doc_lengths(name, n):
    from longnet.plan import document_lengths

    return document_lengths(n, lengths=DOCS[name]) if name in DOCS else None


def _cu(lengths):
    cu = [0]
    for x in lengths:
        cu.append(cu[-1] + x)
    return cu


def _counts(n, h, ws, rs, causal, offset=0, cu=None):
    """The reference's count matrix (H, n, n) of the whole sequence, or with document
    boundaries ``cu`` the block-diagonal one of every document alone."""
    from longnet.reference import pattern_counts

    if cu is None:
        return pattern_counts(n, n, h, ws, rs, causal, position_offset=offset)
    counts = torch.zeros(h, n, n, dtype=torch.int64)
    for c, e in zip(cu[:-1], cu[1:]):
        if e > c:
            counts[:, c:e, c:e] = pattern_counts(
                e - c, e - c, h, ws, rs, causal, position_offset=offset
            )
    return counts


def _minimal_kv_rows(world, chunk, h, hk, ws, rs, causal, offset=0, cu=None):
    """(received, sent) key/value rows per rank, from the reference's count matrix
    alone: for every pattern, the distinct (key, kv head) pairs held by another rank
    that some query of this rank attends through one of that kv head's query heads
    (the exchange runs pattern by pattern, so a key two patterns need counts twice).
    With document boundaries ``cu``: the count matrix of every document alone."""
    n = world * chunk
    recv, sent = [0] * world, [0] * world
    for w, r in zip(ws, rs):
        linked = _counts(n, h, [w], [r], causal, offset, cu) > 0
        linked = linked.view(hk, h // hk, n, n).any(1)  # (kv head, query, key)
        for p in range(world):
            queries = linked[:, p * chunk : (p + 1) * chunk].any(1)  # (kv head, key)
            for src in range(world):
                if src != p:
                    rows = int(queries[:, src * chunk : (src + 1) * chunk].sum())
                    recv[p] += rows
                    sent[src] += rows
    return recv, sent


class _Held:
    __slots__ = ("t", "__weakref__")


def _held_bytes(fn, extra):
    """Run ``fn()`` with every tensor autograd saves wrapped; return its result and
    the bytes of the distinct storages still saved after it (the plan's int64 index
    tensors, held once per configuration, left out) and of ``extra`` tensors."""
    holders = []

    def pack(t):
        h = _Held()
        h.t = t
        holders.append(weakref.ref(h))
        return h

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t):
        result = fn()
    gc.collect()
    storages = {}
    tensors = [h.t for h in (ref() for ref in holders) if h is not None]
    for t in tensors + list(extra) + list(result):
        if t.dtype == torch.int64:
            continue
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return result, sum(storages.values())


def _allocation_peaks(fn):
    """``fn()``'s result, the peak of the bytes it had allocated at once (the CPU
    allocator's events, recorded by the profiler and replayed in time order) and that
    peak with the operator's scratch left out: storages a ``longnet::`` operator
    allocates and frees again before it returns."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = []  # (time, bytes, ptr, the enclosing longnet operator or None)

    def walk(ev, op):
        if ev.name.startswith("longnet::"):
            op = ev
        if ev.tag == _EventType.Allocation:
            f = ev.extra_fields
            events.append((ev.start_time_ns, f.alloc_size, f.ptr, op))
        for child in ev.children:
            walk(child, op)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, None)
    events.sort(key=lambda e: e[0])
    scratch = set()  # indices of both events of a scratch storage
    open_allocs = {}
    for i, (t, size, ptr, _) in enumerate(events):
        if size > 0:
            open_allocs[ptr] = i
        elif ptr in open_allocs:
            j = open_allocs.pop(ptr)
            inside = events[j][3]
            if inside is not None and t <= inside.end_time_ns:
                scratch.update((i, j))
    peaks = []
    for skip in (set(), scratch):
        now = peak = 0
        for i, e in enumerate(events):
            if i not in skip:
                now += e[1]
                peak = max(peak, now)
        peaks.append(peak)
    return result, peaks[0], peaks[1]


def _run_cases(group, sp_rank):
    import torch.distributed as dist

    from longnet.parallel import (
        comm_stats,
        reset_comm_stats,
        sequence_parallel_dilated_attention,
    )

    world = dist.get_world_size(group)
    out = {}
    for name, b, chunk, h, hk, d, ws, rs, causal, dtype in CASES:
        lengths = _doc_lengths(name, world * chunk)
        cu = None if lengths is None else torch.tensor(_cu(lengths))
        g = torch.Generator().manual_seed(sp_rank)
        dt = getattr(torch, dtype)
        q = torch.randn(b, chunk, h, d, generator=g).to(dt).requires_grad_()
        k, v = (torch.randn(b, chunk, hk, d, generator=g).to(dt).requires_grad_() for _ in range(2))

        call = functools.partial(
            sequence_parallel_dilated_attention,
            q,
            k,
            v,
            ws,
            rs,
            group=group,
            is_causal=causal,
            return_lse=True,
            position_offset=OFFSETS.get(name, 0),
            cu_seqlens=cu,
        )

        reset_comm_stats()
        (o, lse), held = _held_bytes(call, (q, k, v))
        (o.float().sum() + lse.masked_fill(torch.isinf(lse), 0).sum()).backward()
        st = comm_stats()
        out[name] = {
            "sent": st.bytes_sent,
            "received": st.bytes_received,
            "calls": st.calls,
            "held": held,
        }
        if name in LARGE:
            # The forward's allocations replayed (warm: the call above ran first).
            gc.collect()
            (o, lse), peak, without_scratch = _allocation_peaks(call)
            out[name]["alloc_peak"] = peak
            out[name]["alloc_peak_without_scratch"] = without_scratch
            o.float().sum().backward()
    return out


def _scenario_plan(rank, world, report):
    """Every case on all 4 ranks, then on two groups of 2 side by side."""
    import torch.distributed as dist

    report["plan"] = {str(world): _run_cases(None, rank)}
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    report["plan"]["2"] = _run_cases(pairs[rank // 2], rank % 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{world size: [(rank in its group, that rank's results)]} from one 4-process run."""
    reports = _spawn(4, ["test_plan:_scenario_plan"], tmp_path_factory.mktemp("plan"))
    for rep in reports:
        assert rep is not None and "exception" not in rep, rep and rep.get("exception")
    return {
        world: [(rep["rank"] % world, rep["plan"][str(world)]) for rep in reports]
        for world in (2, 4)
    }


def _plan_case(case, world):
    name, b, chunk, h, hk, d, ws, rs, causal, dtype = case
    return plan_run(
        world * chunk,
        world,
        heads=h,
        kv_heads=hk,
        head_dim=d,
        batch=b,
        segment_lengths=ws,
        dilation_rates=rs,
        causal=causal,
        dtype=dtype,
        position_offset=OFFSETS.get(name, 0),
        doc_lengths=_doc_lengths(name, world * chunk),
    )


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_planned_bytes_equal_counted_bytes(runs, world, case):
    plan = _plan_case(case, world)
    for rank, rep in runs[world]:
        got = rep[case[0]]
        cost = plan.per_rank[rank]
        assert (cost.bytes_sent, cost.bytes_received) == (got["sent"], got["received"]), (
            rank,
            cost,
            got,
        )
        assert cost.collectives == got["calls"], (rank, cost.collectives, got)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(
    "case", [c for c in CASES if c[0] not in LARGE], ids=[c[0] for c in CASES if c[0] not in LARGE]
)
def test_counted_bytes_are_the_minimal_rows(runs, world, case):
    """What the gloo runs sent and received is exactly the minimal rows of the
    reference's count matrix (k and v forward, their gradients back), not just what
    the planner says: the planner and the run share longnet.parallel.layout.segment, so
    a redundant row there would be counted by both. (The memory case's count matrix
    would take GiBs; the random configurations below check the planner's rows.)"""
    name, b, chunk, h, hk, d, ws, rs, causal, dtype = case
    lengths = _doc_lengths(name, world * chunk)
    cu = None if lengths is None else _cu(lengths)
    recv, sent = _minimal_kv_rows(world, chunk, h, hk, ws, rs, causal, OFFSETS.get(name, 0), cu)
    unit = 2 * b * d * torch.finfo(getattr(torch, dtype)).bits // 8  # a k row and a v row
    plan = _plan_case(case, world)
    for rank, rep in runs[world]:
        got = rep[name]
        # Forward: rows received and sent; backward: their gradients the other way.
        minimal = unit * (recv[rank] + sent[rank])
        assert got["received"] == got["sent"] == minimal, (rank, got, recv, sent)
        cost = plan.per_rank[rank]
        assert (cost.kv_rows_received, cost.kv_rows_sent) == (recv[rank], sent[rank])


def test_some_case_crosses_ranks_and_some_does_not(runs):
    sent = {c[0]: max(rep[c[0]]["sent"] for _, rep in runs[4]) for c in CASES}
    assert sent["all-local"] == 0 and all(v > 0 for k, v in sent.items() if k != "all-local")
    assert _plan_case(CASES[1], 4).crossing_patterns == [2]


# The README says the planned activation memory lands within 2% of the bytes autograd
# keeps (measured 2026-12-02: at most 1.6%, gqa-partial-causal-bf16; 0 for the memory
# case). 3% leaves room for what the plan leaves out (the plan's int64 index tensors are
# not counted on either side); one forgotten or extra buffer of the output's size is 8%
# to 14% of the memory case.
HELD_TOLERANCE = 0.03
# The planned forward peak against the allocator's replayed peak: the ledger counts
# every storage but the 0-d sums that tie q, k, v and the exchange into the outputs
# (4 bytes each, at most 6 alive), so without the operator's scratch the two agree to
# SCALAR_SLACK bytes; with the scratch (single-threaded here: a few KiB of per-call
# tiles) within 10%, as the README states.
SCALAR_SLACK = 64
PEAK_TOLERANCE = 0.10


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_planned_memory_within_3_percent_of_measured(runs, world, case):
    plan = _plan_case(case, world)
    for rank, rep in runs[world]:
        held = rep[case[0]]["held"]
        planned = plan.per_rank[rank].activation_bytes
        assert abs(planned - held) <= HELD_TOLERANCE * held, (rank, planned, held)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", ["memory", "docs-memory"])
def test_planned_peak_equals_the_allocators_peak(runs, world, name):
    """The forward's peak, measured by replaying the CPU allocator's events over one
    call (the profiler's record: deterministic, unlike the resident set, whose growth
    over the same call varied from 2.5 to 3.6 MB across processes), against the planned
    peak less the inputs (allocated before the call): equal but for the tie's 0-d sums
    once the operator's scratch is left out, and within 10% with it."""
    case = next(c for c in CASES if c[0] == name)
    _, b, chunk, h, hk, d, *_ = case
    plan = _plan_case(case, world)
    for rank, rep in runs[world]:
        planned = plan.per_rank[rank].peak_bytes - b * chunk * (h + 2 * hk) * d * 4
        exact = rep[name]["alloc_peak_without_scratch"]
        assert 0 <= exact - planned <= SCALAR_SLACK, (rank, planned, exact)
        measured = rep[name]["alloc_peak"]
        assert abs(planned - measured) <= PEAK_TOLERANCE * measured, (rank, planned, measured)


def test_plan_matches_the_planner_and_the_reference_pair_counts():
    """Rows per rank equal longnet.parallel.schedule.plan_rank's and the minimal rows of the
    reference's count matrix (_minimal_kv_rows), attended pairs equal its sum, on
    random small configurations (half of them with a position_offset)."""
    from longnet.parallel.schedule import plan_rank
    from longnet.reference import pattern_counts

    rnd = random.Random(12)
    for _ in range(150):
        world = rnd.choice([1, 2, 3, 4, 5, 8])
        chunk = rnd.randint(1, 10)
        n = world * chunk
        hk = rnd.choice([1, 2, 3])
        h = hk * rnd.choice([1, 2, 3])
        ws, rs = random_patterns(rnd, n)
        causal = rnd.random() < 0.5
        offset = 0 if rnd.random() < 0.5 else rnd.randint(1, 2 * max(ws))
        plan = plan_run(
            n,
            world,
            heads=h,
            kv_heads=hk,
            head_dim=4,
            segment_lengths=ws,
            dilation_rates=rs,
            causal=causal,
            dtype="float32",
            position_offset=offset,
        )
        counts = pattern_counts(n, n, h, ws, rs, causal, position_offset=offset)
        minimal = _minimal_kv_rows(world, chunk, h, hk, ws, rs, causal, offset)
        cfg = (world, chunk, h, hk, ws, rs, causal, offset)
        for p, cost in enumerate(plan.per_rank):
            assert cost.pairs == int(counts[:, p * chunk : (p + 1) * chunk].sum()), (cfg, p)
            assert cost.flops_fwd == 4 * 4 * cost.pairs
            if world == 1:
                assert cost.kv_rows_sent == cost.kv_rows_received == 0
                continue
            rp = plan_rank(world, p, chunk, h, hk, tuple(ws), tuple(rs), causal, offset)
            assert cost.kv_rows_sent == sum(rp.send_rows) == minimal[1][p], (cfg, p)
            assert cost.kv_rows_received == sum(rp.recv_rows) == minimal[0][p], (cfg, p)
            assert cost.collectives == (2 if rp.exchange else 0), (cfg, p)
        if world > 1:  # every row sent is received
            assert sum(c.kv_rows_sent for c in plan.per_rank) == sum(
                c.kv_rows_received for c in plan.per_rank
            )


def test_plan_with_documents_matches_the_planner_and_the_reference_pair_counts():
    """Packed documents: rows per rank equal longnet.parallel.schedule.plan_rank's and the
    minimal rows of the block-diagonal count matrix (every document alone), attended
    pairs equal its sum, on random small configurations and documents. Catches a
    segment planned across a document boundary (rows of another document, too many
    pairs), segments aligned to the row instead of the document, and rows sent that
    no query of the document needs."""
    from longnet.parallel.layout import spanning_documents
    from longnet.parallel.schedule import plan_rank

    rnd = random.Random(18)
    for _ in range(150):
        world = rnd.choice([1, 2, 3, 4, 5, 8])
        chunk = rnd.randint(1, 10)
        n = world * chunk
        hk = rnd.choice([1, 2, 3])
        h = hk * rnd.choice([1, 2, 3])
        ws, rs = random_patterns(rnd, n)
        causal = rnd.random() < 0.5
        offset = 0 if rnd.random() < 0.5 else rnd.randint(1, 2 * max(ws))
        cu = _random_documents(rnd, n, max(ws))
        lengths = [e - c for c, e in zip(cu[:-1], cu[1:])]
        plan = plan_run(
            n,
            world,
            heads=h,
            kv_heads=hk,
            head_dim=4,
            segment_lengths=ws,
            dilation_rates=rs,
            causal=causal,
            dtype="float32",
            position_offset=offset,
            doc_lengths=lengths,
        )
        counts = _counts(n, h, ws, rs, causal, offset, cu)
        minimal = _minimal_kv_rows(world, chunk, h, hk, ws, rs, causal, offset, cu)
        docs = spanning_documents(cu, world, chunk)
        cfg = (world, chunk, h, hk, ws, rs, causal, offset, cu)
        assert plan.documents == len(lengths)
        for p, cost in enumerate(plan.per_rank):
            assert cost.pairs == int(counts[:, p * chunk : (p + 1) * chunk].sum()), (cfg, p)
            if world == 1:
                assert cost.kv_rows_sent == cost.kv_rows_received == 0
                continue
            rp = plan_rank(world, p, chunk, h, hk, tuple(ws), tuple(rs), causal, offset, docs)
            assert cost.kv_rows_sent == sum(rp.send_rows) == minimal[1][p], (cfg, p)
            assert cost.kv_rows_received == sum(rp.recv_rows) == minimal[0][p], (cfg, p)
            assert cost.collectives == (2 if rp.exchange else 0), (cfg, p)
            # The local calls cover the rank's rows once, in order.
            assert [x.a for x in rp.pieces[1:]] == [x.b for x in rp.pieces[:-1]], rp
            assert rp.pieces[0].a == 0 and rp.pieces[-1].b == chunk, rp


def test_billion_tokens_on_1024_ranks():
    n, p = 2**30, 1024
    ws, rs = geometric_patterns(n, 2048, 1, 2)
    assert ws[-1] == n and len(ws) == 20 and all(w // r == 2048 for w, r in zip(ws, rs))
    plan = plan_run(
        n,
        p,
        heads=12,
        head_dim=64,
        segment_lengths=ws,
        dilation_rates=rs,
        causal=True,
        dtype="bfloat16",
        tflops=400,
        link_gbs=50,
    )
    assert len(plan.per_rank) == p
    # The patterns with w > L = 2^20 cross ranks: 10 of 20.
    assert [ws[i] for i in plan.crossing_patterns] == [2**e for e in range(21, 31)]
    # Every row sent is received; causal: rank 0 receives nothing, the last sends nothing.
    assert sum(c.bytes_sent_fwd for c in plan.per_rank) == sum(
        c.bytes_received_fwd for c in plan.per_rank
    )
    assert plan.per_rank[0].bytes_received_fwd == 0 and plan.per_rank[-1].bytes_sent_fwd == 0
    # Causal, per crossing pattern a rank holds L/r rows per head of a sparse segment of
    # w/r = 2048 rows: it receives at most the 2048 - L/r rows before its own.
    unit = 2 * 64 * 2
    bound = sum(12 * (2048 - 2**20 // rs[i]) * unit for i in plan.crossing_patterns)
    assert plan.per_rank[-1].bytes_received_fwd == bound
    # Pairs over all ranks: the closed form sum over patterns of H * N/w * n(n+1)/2.
    pairs = sum(12 * (n // w) * (w // r) * (w // r + 1) // 2 for w, r in zip(ws, rs))
    assert sum(c.pairs for c in plan.per_rank) == pairs
    assert plan.per_rank[5].compute_s == pytest.approx(3.5 * plan.per_rank[5].flops_fwd / 400e12)


def test_traffic_constant_per_rank_for_fixed_patterns():
    """Fixed patterns, fixed tokens per rank: per-rank bytes stay flat as N and P grow
    (the interior ranks), while geometric patterns add one crossing pattern per
    doubling."""
    fixed = [
        plan_run(
            2**14 * p,
            p,
            heads=8,
            head_dim=64,
            segment_lengths=[2**13, 2**15],
            dilation_rates=[1, 4],
        )
        for p in (4, 8, 64)
    ]
    assert len({pl.worst("bytes_sent_fwd") for pl in fixed}) == 1
    rows = scaling_sweep(
        2**14, [1, 2, 4, 8, 16], heads=8, head_dim=64, first_w=2**10, first_r=1, w_factor=2
    )
    assert [r["crossing_patterns"] for r in rows] == [0, 1, 2, 3, 4]


def test_fit_memory_picks_the_fewest_ranks():
    from longnet.plan import fit_ranks

    kw = dict(
        heads=8,
        head_dim=64,
        segment_lengths=[2048, 8192],
        dilation_rates=[1, 4],
        layers=4,
        dtype="bfloat16",
    )
    n = 2**20
    budget = 3 * 2**30
    p = fit_ranks(n, budget, **kw)
    assert plan_run(n, p, **kw).memory_per_rank_bytes <= budget
    assert plan_run(n, p // 2, **kw).memory_per_rank_bytes > budget
    with pytest.raises(ValueError, match="fit_memory"):
        fit_ranks(n, 1, **kw)


def test_bad_input_names_the_argument():
    kw = dict(heads=4, head_dim=8, segment_lengths=[4], dilation_rates=[1])
    with pytest.raises(ValueError, match="multiple of ranks"):
        plan_run(10, 3, **kw)
    with pytest.raises(ValueError, match="kv_heads"):
        plan_run(8, 2, kv_heads=3, **kw)
    with pytest.raises(ValueError, match="dtype"):
        plan_run(8, 2, dtype="int8", **kw)
    with pytest.raises(ValueError, match="ranks"):
        plan_run(8, 0, **kw)
    with pytest.raises(ValueError, match="position_offset"):
        plan_run(8, 2, position_offset=-1, **kw)
    with pytest.raises(ValueError, match="tflops"):
        plan_run(8, 2, tflops=-1, link_gbs=10, **kw)
    with pytest.raises(ValueError, match="dilation_rates"):
        plan_run(8, 2, heads=4, head_dim=8, segment_lengths=[4], dilation_rates=[8])
    with pytest.raises(ValueError, match="w_factor"):
        geometric_patterns(1024, 16, 1, 1)
    with pytest.raises(ValueError, match="not a count"):
        parse_count("lots")
    assert parse_count("1G") == parse_count("1B") == parse_count("2^30") == 2**30
    assert parse_count("64K") == 65536 and parse_count("1048576") == 2**20


def test_cli_json(capsys):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "longnet.plan",
            "--tokens",
            "64K",
            "--ranks",
            "4",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--head-dim",
            "32",
            "--first-w",
            "2048",
            "--factor",
            "2",
            "--causal",
            "--tflops",
            "100",
            "--link-gbs",
            "25",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    # runpy warns when the package imports its own __main__ before running it.
    assert "found in sys.modules" not in res.stderr, res.stderr
    data = json.loads(res.stdout)
    assert data["ranks"] == 4 and len(data["per_rank"]) == 4
    assert data["segment_lengths"][-1] == 65536 and data["kv_heads"] == 2
    direct = plan_run(
        65536,
        4,
        heads=4,
        kv_heads=2,
        head_dim=32,
        causal=True,
        segment_lengths=data["segment_lengths"],
        dilation_rates=data["dilation_rates"],
    )
    assert [r["bytes_sent"] for r in data["per_rank"]] == [c.bytes_sent for c in direct.per_rank]
    assert data["summary"]["max_comm_to_compute"] > 0


def test_cli_table_sweep_plot_fit_and_errors(tmp_path, capsys):
    from longnet.plan import main

    main(
        [
            "--tokens",
            "64K",
            "--ranks",
            "4",
            "--heads",
            "4",
            "--head-dim",
            "32",
            "--segment-lengths",
            "2048",
            "32768",
            "--dilation-rates",
            "1",
            "8",
            "--sweep",
            "--plot",
            str(tmp_path / "p.png"),
        ]
    )
    out = capsys.readouterr().out
    assert "rank-crossing patterns: 1 of 2" in out and os.path.getsize(tmp_path / "p.png") > 0
    sweep = json.loads((tmp_path / "p.json").read_text())
    assert [r["ranks"] for r in sweep["rows"]] == [1, 2, 4]
    assert [r["crossing_patterns"] for r in sweep["rows"]] == [0, 1, 1]

    main(
        [
            "--tokens",
            "1M",
            "--fit-memory",
            "0.5",
            "--heads",
            "8",
            "--head-dim",
            "64",
            "--first-w",
            "2048",
            "--layers",
            "4",
        ]
    )
    out = capsys.readouterr().out
    p = int(out.split("per device: ")[1].split()[0])
    assert f"P = {p} ranks" in out and p > 1

    for args, message in (
        (["--tokens", "100", "--ranks", "3", "--first-w", "16"], "multiple of ranks"),
        (["--tokens", "1024", "--ranks", "2"], "--segment-lengths"),
        (["--tokens", "1024", "--first-w", "16", "--tflops", "5"], "--link-gbs"),
        (["--tokens", "1024", "--tokens-per-rank", "300", "--first-w", "16"], "--tokens-per-rank"),
    ):
        with pytest.raises(SystemExit):
            main(args + ["--heads", "4", "--head-dim", "32"])
        assert message in capsys.readouterr().err


def test_documents_cut_long_segments_and_can_misalign_short_ones():
    """Per-rank traffic of packed rows against the same row as one sequence: a
    pattern whose segments span ranks exchanges less (its segments are cut to the
    documents); a pattern whose segments the ranks hold whole (L % w == 0) exchanges
    nothing without documents, but a document that starts off its segment grid puts
    a segment across a rank boundary."""
    from longnet.plan import document_lengths

    n, p = 2**16, 4
    lengths = document_lengths(n, distribution="lognormal:4K,1", seed=1)
    kw = dict(heads=4, head_dim=32, causal=True, dtype="bfloat16")

    def traffic(plan):
        return [c.bytes_sent + c.bytes_received for c in plan.per_rank]

    long = dict(kw, segment_lengths=[65536], dilation_rates=[16])
    with_docs, alone = plan_run(n, p, doc_lengths=lengths, **long), plan_run(n, p, **long)
    assert all(0 < a for a in traffic(alone)[1:])
    assert all(a <= b for a, b in zip(traffic(with_docs), traffic(alone)))
    assert sum(traffic(with_docs)) < sum(traffic(alone))
    short = dict(kw, segment_lengths=[2048], dilation_rates=[1])
    assert traffic(plan_run(n, p, **short)) == [0] * p
    assert sum(traffic(plan_run(n, p, doc_lengths=lengths, **short))) > 0


def test_document_lengths_and_errors():
    from longnet.plan import document_lengths

    assert document_lengths(10, lengths=[4, 0, 3]) == [4, 0, 3, 3]
    assert document_lengths(9, distribution="fixed:4") == [4, 4, 1]
    drawn = document_lengths(2**20, distribution="lognormal:4K,0.5", seed=3)
    assert sum(drawn) == 2**20 and min(drawn) >= 1
    # The draws' mean is the distribution's (4096) within a few standard errors.
    mean = sum(drawn[:-1]) / (len(drawn) - 1)
    assert abs(mean - 4096) < 4 * 4096 * 0.55 / (len(drawn) - 1) ** 0.5, mean
    uni = document_lengths(1000, distribution="uniform:0,5", seed=0)
    assert sum(uni) == 1000 and max(uni) <= 5 and 0 in uni
    for spec in ("lognormal:4K", "poisson:3", "uniform:5,2", "fixed:0"):
        with pytest.raises(ValueError, match="distribution"):
            document_lengths(100, distribution=spec)
    kw = dict(heads=4, head_dim=8, segment_lengths=[4], dilation_rates=[1])
    with pytest.raises(ValueError, match="sum to tokens"):
        plan_run(8, 2, doc_lengths=[3, 4], **kw)
    with pytest.raises(ValueError, match=r"doc_lengths\[1\]"):
        plan_run(8, 2, doc_lengths=[9, -1], **kw)
    with pytest.raises(ValueError, match="batch = 1"):
        plan_run(8, 2, batch=2, doc_lengths=[8], **kw)


def test_cli_documents(capsys):
    from longnet.plan import document_lengths, main

    args = [
        "--tokens",
        "64K",
        "--ranks",
        "4",
        "--heads",
        "4",
        "--head-dim",
        "32",
        "--segment-lengths",
        "2048",
        "65536",
        "--dilation-rates",
        "1",
        "16",
        "--causal",
    ]
    main(args + ["--doc-length-dist", "lognormal:4K,1", "--doc-seed", "2", "--json"])
    data = json.loads(capsys.readouterr().out)
    lengths = document_lengths(65536, distribution="lognormal:4K,1", seed=2)
    ws = dict(segment_lengths=[2048, 65536], dilation_rates=[1, 16])
    direct = plan_run(65536, 4, heads=4, head_dim=32, causal=True, doc_lengths=lengths, **ws)
    single = plan_run(65536, 4, heads=4, head_dim=32, causal=True, **ws)
    assert data["documents"] == len(lengths)
    assert [r["bytes_sent"] for r in data["per_rank"]] == [c.bytes_sent for c in direct.per_rank]
    assert [r["bytes_sent"] for r in data["without_documents"]["per_rank"]] == [
        c.bytes_sent for c in single.per_rank
    ]
    main(args + ["--doc-lengths", "3000,500,9K"])
    out = capsys.readouterr().out
    assert "packed documents: " in out and "the same row as one sequence" in out
    assert "with documents" in out and "without" in out
    for extra, message in (
        (["--doc-lengths", "4096", "--sweep"], "--sweep"),
        (["--doc-length-dist", "zipf:2"], "distribution"),
        (["--doc-lengths", "4096", "--batch", "2"], "--batch 1"),
    ):
        with pytest.raises(SystemExit):
            main(args + extra)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(tie_embeddings=False, bias=False),
        dict(norm_style="subln", num_kv_heads=1, ffn_dim=40),
    ],
    ids=["tied", "untied-no-bias", "subln-mqa"],
)
def test_training_plan_counts_the_models_parameters(kw):
    """plan_training's parameters are a LongNetLM's own, each counted once (a tied LM
    head is the embedding): on one rank the shard is the whole model, and on two the
    full parameters in use are the root's and two layers'. Catches a count that
    misses a norm or a bias, or counts a tied head twice."""
    from longnet.model import LongNetConfig, LongNetLM
    from longnet.plan import fsdp_shard_elements, plan_training

    cfg = LongNetConfig(
        vocab_size=50,
        num_layers=3,
        embed_dim=16,
        num_heads=4,
        segment_lengths=[8, 16],
        dilation_rates=[1, 2],
        **kw,
    )
    model = LongNetLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.decoder.layers[0].parameters())
    one = plan_training(cfg, batch=1, seq_len=16, dtype="float32")
    assert one.parameters == total == fsdp_shard_elements(cfg, 1, 0)
    assert one.param_bytes_per_rank == 4 * total and one.unsharded_bytes == 0
    two = plan_training(cfg, batch=2, seq_len=16, dp=2, dtype="float32")
    assert two.unsharded_bytes == 4 * (total - cfg.num_layers * layer + 2 * layer)
