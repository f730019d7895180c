"""Sequence-parallel dilated attention against the single-process float64 reference.

Each scenario spawns 2 or 4 gloo processes on 127.0.0.1 with a bounded join; the
workers compare their rows (outputs, lse and q/k/v gradients) with the dense
reference on the whole sequence and write a JSON report that the tests read.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPAWN_TIMEOUT_S = 90
RANDOM_CASES = 30

# (name, batch, local length L, H, Hk, D, segment_lengths, dilation_rates, causal)
# for a sequence of world * L positions.
CASES = [
    ("mixed", 2, 12, 4, 4, 8, [4, 8, 16], [1, 2, 4], False),
    ("mixed-causal", 2, 12, 4, 4, 8, [4, 8, 16], [1, 2, 4], True),
    ("longer-than-sequence", 1, 12, 4, 4, 8, [6, 100], [1, 3], False),
    ("longer-than-sequence-causal", 1, 12, 4, 4, 8, [6, 100], [1, 3], True),
    ("gqa-uneven-offsets", 1, 12, 6, 2, 8, [5, 24], [2, 3], False),
    ("gqa-uneven-offsets-causal", 1, 12, 6, 2, 8, [5, 24], [2, 3], True),
    ("mqa-partial-local", 1, 12, 4, 1, 8, [5, 9], [1, 2], True),
    ("no-dense-pattern", 1, 12, 4, 2, 8, [8, 24], [2, 4], True),
    ("rate-above-chunk", 1, 12, 5, 5, 4, [48], [16], False),
    ("ranks-without-rows", 1, 4, 2, 2, 4, [16], [16], True),
    ("offset-mixed", 2, 12, 4, 4, 8, [4, 8, 16], [1, 2, 4], False),
    ("offset-mixed-causal", 2, 12, 4, 4, 8, [4, 8, 16], [1, 2, 4], True),
    ("offset-gqa-causal", 1, 12, 6, 2, 8, [5, 24], [2, 3], True),
]
# position_offset of the whole sequence (the absolute position of its first token);
# random cases draw theirs in _position_offset.
OFFSETS = {"offset-mixed": 5, "offset-mixed-causal": 13, "offset-gqa-causal": 7}


def _position_offset(case) -> int:
    """The case's position_offset: OFFSETS for named cases; for random ones, 0 or a
    draw up to twice the largest segment, seeded by the case's name."""
    import random

    name, ws = case[0], case[6]
    if not name.startswith("random"):
        return OFFSETS.get(name, 0)
    rnd = random.Random(name + str(ws))
    return 0 if rnd.random() < 0.5 else rnd.randint(1, 2 * max(ws))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_patterns(rnd, n):
    """1 to 3 random patterns (w up to 2n + 2, r up to min(w, n + 2)) for n tokens."""
    ws, rs = [], []
    for _ in range(rnd.randint(1, 3)):
        w = rnd.randint(1, 2 * n + 2)
        ws.append(w)
        rs.append(rnd.randint(1, min(w, n + 2)))
    return ws, rs


def _random_cases(world, count, seed):
    """Random configurations (the same on every rank: seeded by world and seed)."""
    import random

    rnd = random.Random(1000 * world + seed)
    cases = []
    for c in range(count):
        chunk = rnd.randint(1, 9)
        n = world * chunk
        hk = rnd.choice([1, 2, 3])
        h = hk * rnd.choice([1, 2, 3])
        ws, rs = random_patterns(rnd, n)
        cases.append(
            (f"random-{c}", rnd.randint(1, 2), chunk, h, hk, 4, ws, rs, rnd.random() < 0.5)
        )
    return cases


def _random_documents(rnd, n, max_w):
    """Boundaries of 1..64 documents filling a row of n tokens: lengths 0..u for a
    log-uniform u in [1, 3 * max_w] (one in ten empty), the last one stretched to
    fill the row."""
    u = max(1, round((3 * max_w) ** rnd.random()))
    cu = [0]
    while cu[-1] < n and len(cu) <= 64:
        length = 0 if rnd.random() < 0.1 else rnd.randint(1, u)
        cu.append(min(n, cu[-1] + length))
    cu[-1] = n
    return cu


DOC_CASES = 24


def _document_cases(world, count, seed):
    """Random packed rows (batch 1) with random patterns, the same on every rank: (name,
    L, H, Hk, D, ws, rs, causal, position_offset, cu_seqlens, low-precision dtype)."""
    import random

    rnd = random.Random(7000 + 1000 * world + seed)
    cases = []
    for c in range(count):
        chunk = rnd.randint(1, 12)
        n = world * chunk
        hk = rnd.choice([1, 2, 3])
        h = hk * rnd.choice([1, 2, 3])
        ws, rs = random_patterns(rnd, n)
        causal = rnd.random() < 0.5
        offset = 0 if rnd.random() < 0.5 else rnd.randint(1, 2 * max(ws))
        cu = _random_documents(rnd, n, max(ws))
        low = "bfloat16" if c % 4 == 0 else "float32"
        cases.append((f"docs-{c}", chunk, h, hk, 4, ws, rs, causal, offset, cu, low))
    return cases


def _documents_reference(q, k, v, ws, rs, causal, offset, cu):
    """The float64 reference on every document alone, concatenated: (out, lse)."""
    from longnet.reference import dilated_attention_reference

    outs, lses = [], []
    for c, e in zip(cu[:-1], cu[1:]):
        if e > c:
            o, lse = dilated_attention_reference(
                q[:, c:e], k[:, c:e], v[:, c:e], ws, rs, is_causal=causal, position_offset=offset
            )
            outs.append(o)
            lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 2)


def _full_inputs(case, world, seed=0):
    _, b, chunk, h, hk, d, _, _, _ = case
    n = world * chunk
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(b, n, h, d), mk(b, n, hk, d), mk(b, n, hk, d), mk(b, n, h, d), mk(b, h, n)


def _finite(x):
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _scenario_correctness(rank, world, report):
    from longnet.parallel import sequence_parallel_dilated_attention
    from longnet.reference import dilated_attention_reference

    errors = {}
    for case in CASES + _random_cases(world, RANDOM_CASES, seed=0):
        name, _, chunk, _, _, _, ws, rs, causal = case
        offset = _position_offset(case)
        q, k, v, gout, glse = _full_inputs(case, world)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = dilated_attention_reference(
            *full, ws, rs, is_causal=causal, position_offset=offset
        )
        (ref_out * gout).sum().add((_finite(ref_lse) * glse).sum()).backward()
        sl = slice(rank * chunk, (rank + 1) * chunk)
        loc = [t[:, sl].clone().requires_grad_() for t in (q, k, v)]
        out, lse = sequence_parallel_dilated_attention(
            *loc, ws, rs, is_causal=causal, return_lse=True, position_offset=offset
        )
        (out * gout[:, sl]).sum().add((_finite(lse) * glse[:, :, sl]).sum()).backward()
        same_inf = bool(torch.equal(torch.isinf(lse), torch.isinf(ref_lse[:, :, sl])))
        errors[name] = {
            "out": (out - ref_out[:, sl]).abs().max().item(),
            "lse": (_finite(lse) - _finite(ref_lse[:, :, sl])).abs().max().item(),
            "lse_inf_match": same_inf,
            "any_inf": bool(torch.isinf(ref_lse).any()),
            "dq": (loc[0].grad - full[0].grad[:, sl]).abs().max().item(),
            "dk": (loc[1].grad - full[1].grad[:, sl]).abs().max().item(),
            "dv": (loc[2].grad - full[2].grad[:, sl]).abs().max().item(),
            "finite": bool(all(torch.isfinite(t.grad).all() for t in loc)),
        }
        # float32 through the compiled kernel, forward only, against the reference.
        out32 = sequence_parallel_dilated_attention(
            *(t[:, sl].float() for t in (q, k, v)), ws, rs, is_causal=causal, position_offset=offset
        )
        errors[name]["out_f32"] = (out32.double() - ref_out[:, sl]).abs().max().item()
        if not name.startswith("random"):
            out16 = sequence_parallel_dilated_attention(
                *(t[:, sl].bfloat16() for t in (q, k, v)),
                ws,
                rs,
                is_causal=causal,
                position_offset=offset,
            )
            errors[name]["out_bf16"] = (out16.double() - ref_out[:, sl]).abs().max().item()
    report["errors"] = errors

    # split_sequence / gather_sequence round trip and its gradient.
    from longnet.parallel import gather_sequence, split_sequence

    x = torch.randn(
        2, 4 * world, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    weights = [
        torch.randn(
            2, 4 * world, 3, generator=torch.Generator().manual_seed(10 + p), dtype=torch.float64
        )
        for p in range(world)
    ]
    part = split_sequence(x, dim=1).clone().requires_grad_()
    whole = gather_sequence(part, dim=1)
    (whole * weights[rank]).sum().backward()
    expected = sum(weights)[:, rank * 4 : (rank + 1) * 4]
    report["gather_roundtrip"] = bool(torch.equal(whole, x))
    report["gather_grad_err"] = (part.grad - expected).abs().max().item()


def _scenario_documents(rank, world, report):
    """Packed documents crossing ranks: this rank's rows of values, lse and gradients
    against every document alone (float64 reference), in float64 and in float32 or
    bfloat16 on the same rounded inputs (relative norm errors)."""
    from longnet.parallel import sequence_parallel_dilated_attention

    errors = {}
    for case in _document_cases(world, DOC_CASES, seed=0):
        name, chunk, h, hk, d, ws, rs, causal, offset, cu, low = case
        n = world * chunk
        gen = torch.Generator().manual_seed(3)
        q, k, v, gout, glse = (
            torch.randn(*shape, generator=gen, dtype=torch.float64)
            for shape in ((1, n, h, d), (1, n, hk, d), (1, n, hk, d), (1, n, h, d), (1, h, n))
        )
        sl = slice(rank * chunk, (rank + 1) * chunk)
        cu_t = torch.tensor(cu)
        errors[name] = {}
        for dtype in ("float64", low):
            dt = getattr(torch, dtype)
            # Inputs and incoming gradients rounded to the format (the lse's gradient
            # to float32, lse's format) so both sides see the same numbers.
            qr, kr, vr = (t.to(dt).double() for t in (q, k, v))
            go = gout.to(dt).double()
            gl = glse.float().double()
            full = [t.clone().requires_grad_() for t in (qr, kr, vr)]
            ref_out, ref_lse = _documents_reference(*full, ws, rs, causal, offset, cu)
            (ref_out * go).sum().add((_finite(ref_lse) * gl).sum()).backward()
            loc = [t[:, sl].to(dt).clone().requires_grad_() for t in (qr, kr, vr)]
            out, lse = sequence_parallel_dilated_attention(
                *loc,
                ws,
                rs,
                is_causal=causal,
                return_lse=True,
                position_offset=offset,
                cu_seqlens=cu_t,
            )
            loss = (out.double() * go[:, sl]).sum() + (_finite(lse).double() * gl[:, :, sl]).sum()
            loss.backward()

            def err(a, b, dtype=dtype):
                a, b = _finite(a.double()), _finite(b.double())
                if dtype == "float64":
                    return (a - b).abs().max().item()
                return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()

            errors[name][dtype] = {
                "out": err(out, ref_out[:, sl]),
                "lse": err(lse, ref_lse[:, :, sl]),
                "lse_inf_match": bool(
                    torch.equal(torch.isinf(lse), torch.isinf(ref_lse[:, :, sl]))
                ),
                "dq": err(loc[0].grad, full[0].grad[:, sl]),
                "dk": err(loc[1].grad, full[1].grad[:, sl]),
                "dv": err(loc[2].grad, full[2].grad[:, sl]),
                "finite": bool(all(torch.isfinite(t.grad).all() for t in loc)),
            }
    report["documents"] = errors


def _scenario_module_documents(rank, world, report):
    """MultiheadDilatedAttention (rotary, then xPos) on packed documents that cross
    ranks, under sequence parallelism: this rank's output rows and the parameter
    gradients summed over ranks against the same module in one process (float64)."""
    import torch.distributed as dist

    from longnet.modules import MultiheadDilatedAttention

    chunk = 24
    n = world * chunk
    cu = torch.tensor([0, 5, 5, chunk + 7, n - 3, n])  # documents crossing ranks, one empty
    errors = {}
    for encoding in ("rotary", "xpos"):
        torch.manual_seed(0)
        mod = MultiheadDilatedAttention(
            32,
            4,
            [4, 8, 16],
            [1, 2, 4],
            num_kv_heads=2,
            position_encoding=encoding,
            dtype=torch.float64,
        )
        x = torch.randn(1, n, 32, dtype=torch.float64)
        want = mod(x, cu_seqlens=cu)
        want.square().sum().backward()
        want_grads = [p.grad.clone() for p in mod.parameters()]
        mod.zero_grad()
        mod.sequence_parallel_group = dist.group.WORLD
        got = mod(x[:, rank * chunk : (rank + 1) * chunk], cu_seqlens=cu)
        got.square().sum().backward()
        grads = [p.grad.clone() for p in mod.parameters()]
        for g in grads:
            dist.all_reduce(g)
        errors[encoding] = {
            "out": (got - want[:, rank * chunk : (rank + 1) * chunk]).abs().max().item(),
            "grads": max((a - b).abs().max().item() for a, b in zip(grads, want_grads)),
        }
    report["module_documents"] = errors


def _scenario_subgroups(rank, world, report):
    """Two sequence-parallel groups side by side (data parallel beside them)."""
    import torch.distributed as dist

    from longnet.parallel import sequence_parallel_dilated_attention
    from longnet.reference import dilated_attention_reference

    size = world // 2
    groups = [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(2)]
    mine, sp_rank = rank // size, rank % size
    case = CASES[1]  # mixed-causal
    _, _, chunk, _, _, _, ws, rs, causal = case
    q, k, v, gout, _ = _full_inputs(case, size, seed=100 + mine)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = dilated_attention_reference(*full, ws, rs, is_causal=causal)
    (ref_out * gout).sum().backward()
    sl = slice(sp_rank * chunk, (sp_rank + 1) * chunk)
    loc = [t[:, sl].clone().requires_grad_() for t in (q, k, v)]
    out = sequence_parallel_dilated_attention(*loc, ws, rs, is_causal=causal, group=groups[mine])
    (out * gout[:, sl]).sum().backward()
    errs = [(out - ref_out[:, sl]).abs().max().item()]
    errs += [(a.grad - b.grad[:, sl]).abs().max().item() for a, b in zip(loc, full)]
    report["subgroup_err"] = max(errs)


def _scenario_bytes(rank, world, report):
    """Bytes per rank for fixed patterns and fixed L, forward and backward."""
    from longnet.parallel import (
        comm_stats,
        reset_comm_stats,
        sequence_parallel_dilated_attention,
    )

    chunk, h, d = 16, 4, 8
    result = {}
    for causal in (False, True):
        g = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(1, chunk, h, d, generator=g).requires_grad_() for _ in range(3))
        reset_comm_stats()
        out = sequence_parallel_dilated_attention(q, k, v, [8, 16, 32], [1, 2, 4], is_causal=causal)
        out.sum().backward()
        st = comm_stats()
        result[str(causal)] = [st.bytes_sent, st.bytes_received]
    report["bytes"] = result


def _scenario_mismatch(rank, world, report):
    from longnet.parallel import sequence_parallel_dilated_attention

    msgs = []
    for variant in ("rates", "length", "causal"):
        chunk = 8 + (1 if variant == "length" and rank == 1 else 0)
        rates = [1, 2] if variant == "rates" and rank == 1 else [1, 4]
        causal = variant == "causal" and rank == 0
        x = torch.randn(1, chunk, 4, 8)
        try:
            sequence_parallel_dilated_attention(x, x, x, [4, 16], rates, is_causal=causal)
            msgs.append(None)
        except ValueError as exc:
            msgs.append(str(exc))
    report["mismatch"] = msgs
    # Document boundaries that differ between ranks, and bad ones (raised before any
    # exchange, the same on every rank).
    x = torch.randn(1, 8, 4, 8)
    bad = {
        "differ": torch.tensor([0, 5 + rank, 16]),
        "dtype": torch.tensor([0.0, 16.0]),
        "decreasing": torch.tensor([0, 9, 4, 16]),
        "last": torch.tensor([0, 4, 12]),
        "batch": torch.tensor([0, 16]),
    }
    docs = {}
    for variant, cu in bad.items():
        xx = x.expand(2, -1, -1, -1) if variant == "batch" else x
        try:
            sequence_parallel_dilated_attention(xx, xx, xx, [4, 16], [1, 4], cu_seqlens=cu)
            docs[variant] = None
        except ValueError as exc:
            docs[variant] = str(exc)
    report["mismatch_documents"] = docs


def _scenario_dead(rank, world, report):
    from longnet.parallel import sequence_parallel_dilated_attention

    x = torch.randn(1, 8, 2, 4)
    sequence_parallel_dilated_attention(x, x, x, [16], [2])  # a first call that works
    if rank == 1:
        os._exit(3)
    start = time.time()
    try:
        sequence_parallel_dilated_attention(x, x, x, [16], [2])
        report["error"] = None
    except RuntimeError as exc:
        report["error"] = str(exc)
    report["seconds"] = time.time() - start


def _scenario_stuck(rank, world, report):
    import longnet.parallel as lnp
    from longnet.parallel import sequence_parallel_dilated_attention

    lnp.set_timeout(3)
    x = torch.randn(1, 8, 2, 4)
    if rank == 1:
        time.sleep(8)  # alive but never joins in time
        return
    start = time.time()
    try:
        sequence_parallel_dilated_attention(x, x, x, [16], [2])
        report["error"] = None
    except RuntimeError as exc:
        report["error"] = str(exc)
    report["seconds"] = time.time() - start


def _scenario(name):
    """``_scenario_<name>`` of this file, or ``module:function`` (another test file's)."""
    if ":" in name:
        module, function = name.split(":")
        return getattr(importlib.import_module(module), function)
    return globals()[f"_scenario_{name}"]


def _worker(rank, world, port, scenarios, path):
    import datetime

    sys.path.insert(0, ROOT)
    torch.set_num_threads(1)
    report = {"rank": rank, "dir": os.path.dirname(path)}  # a folder for scenario files
    try:
        import torch.distributed as dist

        import longnet.parallel as lnp

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        lnp.set_timeout(30)
        for name in scenarios:
            _scenario(name)(rank, world, report)
    except Exception:  # reported to the test, which fails with it
        report["exception"] = traceback.format_exc()
    with open(path, "w") as f:
        json.dump(report, f)
    # Skip the process group's shutdown handshake: a peer may be gone on purpose.
    os._exit(0)


def spawn_ranks(worker, world, scenarios, tmp_path, timeout_s):
    """Run ``worker(rank, world, port, scenarios, report_path)`` in ``world`` spawned
    processes; the JSON reports they wrote, in rank order (``None`` for a rank that
    wrote none). Fails the test when a rank is still running after ``timeout_s``."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    paths = [str(tmp_path / f"rank{r}-{'-'.join(scenarios)}.json") for r in range(world)]
    procs = [
        ctx.Process(target=worker, args=(r, world, port, scenarios, paths[r])) for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.time() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    if hung:
        pytest.fail(f"ranks {hung} still running after {timeout_s} s")
    reports = []
    for path in paths:
        if os.path.exists(path):
            with open(path) as f:
                reports.append(json.load(f))
        else:
            reports.append(None)
    return reports


def _spawn(world, scenarios, tmp_path):
    return spawn_ranks(_worker, world, scenarios, tmp_path, SPAWN_TIMEOUT_S)


@pytest.fixture(scope="module")
def reports_by_world(tmp_path_factory):
    """Reports of the 2-rank and 4-rank runs (correctness and traffic scenarios)."""
    result = {}
    for world in (2, 4):
        scenarios = ["correctness", "bytes", "documents", "module_documents"]
        scenarios += ["subgroups"] if world == 4 else []
        reports = _spawn(world, scenarios, tmp_path_factory.mktemp(f"w{world}"))
        for rep in reports:
            assert rep is not None and "exception" not in rep, rep and rep.get("exception")
        result[world] = reports
    return result


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_matches_single_process_reference(reports_by_world, world, case):
    for rep in reports_by_world[world]:
        err = rep["errors"][case]
        assert err["lse_inf_match"], f"rank {rep['rank']}: -inf rows differ"
        assert err["finite"], f"rank {rep['rank']}: non-finite gradients"
        for key in ("out", "lse", "dq", "dk", "dv"):
            assert err[key] < 1e-10, f"rank {rep['rank']} of {world}: {key} error {err[key]}"
        assert err["out_f32"] < 1e-4, f"rank {rep['rank']}: float32 error {err['out_f32']}"
        assert err["out_bf16"] < 5e-2, f"rank {rep['rank']}: bfloat16 error {err['out_bf16']}"


@pytest.mark.parametrize("world", [2, 4])
def test_module_packed_documents_match_one_process(reports_by_world, world):
    """Positions restart per document on every rank (rotary and xPos), and the
    documents that cross ranks are attended alone: float64 to 1e-10."""
    for rep in reports_by_world[world]:
        for encoding, err in rep["module_documents"].items():
            assert err["out"] < 1e-10 and err["grads"] < 1e-10, (rep["rank"], encoding, err)


@pytest.mark.parametrize("world", [2, 4])
def test_random_configurations_match_reference(reports_by_world, world):
    for rep in reports_by_world[world]:
        for case in _random_cases(world, RANDOM_CASES, seed=0):
            err = rep["errors"][case[0]]
            assert err["lse_inf_match"] and err["finite"], (case, err)
            worst = max(err[key] for key in ("out", "lse", "dq", "dk", "dv"))
            assert worst < 1e-10, (rep["rank"], case, err)


# Packed documents. float64: the same sums in another order (the fragments, packed
# call and exchanged segments merged by their lse), errors ~1e-15; 1e-12 leaves the
# growth of a few hundred roundings. Low precision: relative norm errors against the
# float64 reference on the same rounded inputs (test_op.low_precision_tolerances'
# derivation): float32 accumulation 1e-5 for everything; bfloat16 rounds every
# operator result (u = 2**-8) and again after each of at most len(ws) merges of a
# rank-crossing pattern, and the backward rounds the incoming gradient at each merge:
# out and dv (1 + len(ws)) u, dq and dk (2 + len(ws)) u (Delta adds one), lse float32.
_F32 = 1e-5


def _document_bounds(dtype, n_patterns):
    if dtype == "float64":
        return dict.fromkeys(("out", "lse", "dq", "dk", "dv"), 1e-12)
    if dtype == "float32":
        return dict.fromkeys(("out", "lse", "dq", "dk", "dv"), _F32)
    u = 2.0**-8
    m = 1 + n_patterns
    return {
        "out": m * u + _F32,
        "dv": m * u + _F32,
        "dq": (m + 1) * u + _F32,
        "dk": (m + 1) * u + _F32,
        "lse": _F32,
    }


@pytest.mark.parametrize("world", [2, 4])
def test_packed_documents_match_each_document_alone(reports_by_world, world):
    """Catches keys or segments that cross a document boundary, a fragment's segments
    aligned to the row or the rank instead of its document, a missing fragment call
    or merge, and gradients that miss a rank's share."""
    cases = _document_cases(world, DOC_CASES, seed=0)
    for rep in reports_by_world[world]:
        for case in cases:
            name, ws, low = case[0], case[5], case[-1]
            for dtype in ("float64", low):
                err = rep["documents"][name][dtype]
                assert err["lse_inf_match"] and err["finite"], (rep["rank"], case, dtype, err)
                for key, bound in _document_bounds(dtype, len(ws)).items():
                    assert err[key] <= bound, (rep["rank"], case, dtype, key, err[key], bound)


def test_document_cases_cover_what_matters():
    """The random packed rows hold documents over several ranks, many documents on one
    rank, empty documents, causal and not, GQA, a position_offset and bfloat16."""
    from longnet.parallel.layout import spanning_documents

    cases = _document_cases(4, DOC_CASES, seed=0) + _document_cases(2, DOC_CASES, seed=0)
    docs = [c[9] for c in cases]
    assert max(len(cu) - 1 for cu in docs) >= 30
    assert any(e == c for cu in docs for c, e in zip(cu[:-1], cu[1:]))
    over = [
        max(((e - 1) // c_[1] - s // c_[1] for s, e in spanning_documents(cu, 4, c_[1])), default=0)
        for c_, cu in zip(cases[:DOC_CASES], docs[:DOC_CASES])
    ]
    assert max(over) >= 2  # a document on three ranks or more
    assert {c[7] for c in cases} == {False, True} and any(c[2] > c[3] for c in cases)
    assert any(c[8] for c in cases) and any(c[-1] == "bfloat16" for c in cases)


def test_some_case_has_rows_without_keys(reports_by_world):
    assert reports_by_world[2][0]["errors"]["no-dense-pattern"]["any_inf"]


@pytest.mark.parametrize("world", [2, 4])
def test_split_and_gather_sequence(reports_by_world, world):
    for rep in reports_by_world[world]:
        assert rep["gather_roundtrip"]
        assert rep["gather_grad_err"] < 1e-12


def test_two_sequence_parallel_groups_side_by_side(reports_by_world):
    for rep in reports_by_world[4]:
        assert rep["subgroup_err"] < 1e-10, rep["subgroup_err"]


def test_bytes_per_rank_constant_when_sequence_and_ranks_double(reports_by_world):
    """Fixed patterns and tokens per rank: twice the ranks, twice the sequence,
    the same bytes on every rank."""
    for causal in ("False", "True"):
        two = sorted({tuple(r["bytes"][causal]) for r in reports_by_world[2]})
        four = sorted({tuple(r["bytes"][causal]) for r in reports_by_world[4]})
        assert two == four, (causal, two, four)
    # Only the w=32, r=4 pattern crosses ranks (L = 16): a rank sends its L/r = 4 rows
    # per head of k and v (4 heads, D = 8, float32) to its partner, and the partner
    # sends their gradients back; causal, only the earlier rank sends forward.
    rows_bytes = 4 * 4 * 8 * 2 * 4
    for world in (2, 4):
        for rep in reports_by_world[world]:
            assert rep["bytes"]["False"] == [2 * rows_bytes, 2 * rows_bytes], rep["bytes"]
            assert rep["bytes"]["True"] == [rows_bytes, rows_bytes], rep["bytes"]


def test_errors_before_any_communication():
    from longnet.parallel import sequence_parallel_dilated_attention, split_sequence

    x = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="same positions as q"):
        sequence_parallel_dilated_attention(x[:, :4], x, x, [4], [1])
    with pytest.raises(ValueError, match="dilation_rates"):
        sequence_parallel_dilated_attention(x, x, x, [4], [8])
    with pytest.raises(RuntimeError, match="init_process_group"):
        sequence_parallel_dilated_attention(x, x, x, [4], [1])
    with pytest.raises(RuntimeError, match="init_process_group"):
        split_sequence(x)


def test_mismatched_configuration_raises_on_every_rank(tmp_path):
    reports = _spawn(2, ["mismatch"], tmp_path)
    for rep in reports:
        assert rep is not None and "exception" not in rep, rep and rep.get("exception")
        rates, length, causal = rep["mismatch"]
        assert rates and "segment_lengths/dilation_rates" in rates
        assert length and "local sequence length L" in length and "rank 1: 9" in length
        assert causal and "is_causal" in causal
        docs = rep["mismatch_documents"]
        assert docs["differ"] and "different cu_seqlens" in docs["differ"]
        assert docs["dtype"] and "int32 or int64" in docs["dtype"]
        assert docs["decreasing"] and "nondecreasing" in docs["decreasing"]
        assert docs["last"] and "end at the global sequence length" in docs["last"]
        assert docs["last"] and "16" in docs["last"]
        assert docs["batch"] and "batch size 1" in docs["batch"]


@pytest.mark.parametrize("scenario", ["dead", "stuck"])
def test_lost_rank_raises_within_timeout(tmp_path, scenario):
    reports = _spawn(2, [scenario], tmp_path)
    rep = reports[0]
    assert rep is not None and "exception" not in rep, rep and rep.get("exception")
    assert rep["error"] is not None and "longnet.parallel" in rep["error"]
    assert rep["seconds"] < 10, rep["seconds"]
    if scenario == "dead":
        assert reports[1] is None  # the rank really died
