"""Absolute positions (``position_offset``) and padded batches (``key_start``,
``key_end``) in the operator, against the float64 reference (docs/operator.md)."""

import random
import re

import pytest
import torch

import longnet
from longnet.reference import dilated_attention_reference, pattern_counts
from tests.test_op import (
    check_compiled_matches_eager,
    loss_on_both,
    low_precision_tolerances,
    make_inputs,
)

ENGINES = ["fused", "cpu_flash", "math"]  # every engine that runs on CPU tensors


def run(q, k, v, ws, rs, causal, engine="fused", **kw):
    """(out, lse, grads of loss_on_both) of the operator, forward and backward on
    ``engine`` (checked after each)."""
    with longnet.use_engine(engine):
        out, lse = longnet.dilated_attention(
            q, k, v, ws, rs, is_causal=causal, return_lse=True, **kw
        )
        assert longnet.last_engine() == engine
        grads = torch.autograd.grad(loss_on_both(out, lse), (q, k, v))
        assert longnet.last_engine() == engine
    return out, lse, grads


def run_reference(q, k, v, ws, rs, causal, **kw):
    out, lse = dilated_attention_reference(q, k, v, ws, rs, is_causal=causal, **kw)
    grads = torch.autograd.grad(loss_on_both(out, lse), (q, k, v))
    return out, lse, grads


def assert_close_all(got, want, atol=1e-10, rtol=1e-9):
    out, lse, grads = got
    r_out, r_lse, r_grads = want
    torch.testing.assert_close(out, r_out, atol=atol, rtol=rtol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(r_lse))
    torch.testing.assert_close(lse, r_lse, atol=atol, rtol=rtol)
    for name, g, rg in zip("qkv", grads, r_grads):
        torch.testing.assert_close(g, rg, atol=atol, rtol=rtol, msg=f"d{name} mismatch")


# ------------------------------------------------------- the reference itself ----


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_reference_counts_with_offset_and_range_follow_the_rule(causal):
    # pattern_counts checked element by element against the membership rule written
    # out longhand: key index t of a row [start, end) sits at position
    # offset + t - start, query i at key index end - nq + i.
    nq, nk, h, ws, rs = 6, 20, 3, [4, 7, 12], [1, 2, 3]
    offset, start, end = 5, 3, 17
    counts = pattern_counts(
        nq, nk, h, ws, rs, causal, position_offset=offset, key_start=start, key_end=end
    )
    for j in range(h):
        for i in range(nq):
            qi = end - nq + i
            for t in range(nk):
                want = 0
                if start <= qi and start <= t < end:
                    p, s = offset + qi - start, offset + t - start
                    for w, r in zip(ws, rs):
                        o = j % r
                        if p // w == s // w and (p % w) % r == o and (s % w) % r == o:
                            want += 1
                    if causal and s > p:
                        want = 0
                assert counts[j, i, t] == want, (j, i, t)


# -------------------------------------------------- kernels against reference ----


def _random_config(rng):
    b = rng.randint(1, 3)
    h = rng.choice([1, 2, 3, 4, 6])
    hk = rng.choice([x for x in range(1, h + 1) if h % x == 0])
    d = rng.choice([3, 8, 16])
    nk = rng.randint(1, 70)
    nq = rng.randint(1, nk)
    ws = [rng.randint(1, 40) for _ in range(rng.randint(1, 3))]
    rs = [rng.randint(1, min(w, 6)) for w in ws]
    return b, nq, nk, h, hk, d, ws, rs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("engine", ENGINES)
def test_random_offsets_and_ranges_match_reference(engine, seed):
    # Random shapes, patterns, offsets and key ranges (empty, full, partial rows),
    # causal and not: out, lse and all three gradients of a loss on both, on every
    # engine (the composition plans its dense problems from the same ranges).
    rng = random.Random(seed)
    for trial in range(12):
        b, nq, nk, h, hk, d, ws, rs = _random_config(rng)
        causal = rng.random() < 0.5
        offset = rng.choice([0, rng.randint(1, 3 * max(ws))])
        starts = [rng.randint(0, nk) for _ in range(b)]
        ends = [rng.randint(s, nk) for s in starts]
        kw = dict(
            position_offset=offset, key_start=torch.tensor(starts), key_end=torch.tensor(ends)
        )
        q, k, v = make_inputs(b, nq, nk, h, hk, d, seed=seed * 100 + trial)
        assert_close_all(
            run(q, k, v, ws, rs, causal, engine, **kw), run_reference(q, k, v, ws, rs, causal, **kw)
        )


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("engine", ENGINES)
def test_key_ranges_and_offset_on_long_blocks(engine, causal):
    # The random matrix's Nk <= 70 never spans the fused kernels' 128-query and
    # 256-key blocks: rows [37, 640) and [0, 500) at position_offset 517 (partial first
    # segments, a range that starts and one that ends inside a block), GQA, Nq < Nk.
    q, k, v = make_inputs(2, 300, 640, 4, 2, 16, seed=7)
    kw = dict(
        position_offset=517, key_start=torch.tensor([37, 0]), key_end=torch.tensor([640, 500])
    )
    assert_close_all(
        run(q, k, v, [300, 600], [1, 2], causal, engine, **kw),
        run_reference(q, k, v, [300, 600], [1, 2], causal, **kw),
    )


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("engine", ENGINES)
def test_key_start_alone(engine, causal):
    # key_start without key_end: every row ends at Nk; row 2's first query rows
    # (keys 20..21) fall before its key_start and reach no key.
    q, k, v = make_inputs(3, 20, 40, 4, 2, 8, seed=8)
    kw = dict(key_start=torch.tensor([0, 9, 22]), position_offset=2)
    got = run(q, k, v, [6, 12, 24], [1, 2, 3], causal, engine, **kw)
    assert torch.isneginf(got[1][2, :, :2]).all() and torch.isfinite(got[1][:2]).all()
    assert_close_all(got, run_reference(q, k, v, [6, 12, 24], [1, 2, 3], causal, **kw))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_offset_matches_reference_on_long_blocks(causal):
    # Sparse segments longer than the CPU kernels' query (128) and key (256) blocks,
    # a partial first segment (offset not a multiple of any w), GQA, Nq < Nk.
    q, k, v = make_inputs(2, 300, 640, 4, 2, 16)
    kw = dict(position_offset=517)
    assert_close_all(
        run(q, k, v, [300, 600], [1, 2], causal, **kw),
        run_reference(q, k, v, [300, 600], [1, 2], causal, **kw),
    )


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_offset_of_whole_periods_changes_nothing(causal):
    # Shifting every position by a multiple of every w keeps the segments: results
    # must be bit for bit those of offset 0 (catches offset arithmetic that drifts).
    ws, rs = [6, 8, 12], [1, 2, 4]
    q, k, v = make_inputs(2, 30, 50, 4, 2, 8)
    base = longnet.dilated_attention(q, k, v, ws, rs, is_causal=causal, return_lse=True)
    shifted = longnet.dilated_attention(
        q, k, v, ws, rs, is_causal=causal, return_lse=True, position_offset=24 * 7
    )
    other = longnet.dilated_attention(
        q, k, v, ws, rs, is_causal=causal, return_lse=True, position_offset=5
    )
    assert torch.equal(base[0], shifted[0]) and torch.equal(base[1], shifted[1])
    assert not torch.allclose(base[0], other[0])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_chunk_of_a_longer_sequence_computed_in_place(causal):
    # The tail of a sequence, with the keys before min_i floor(p0 / w_i) * w_i
    # dropped and position_offset set to where the kept keys start, gives the same
    # rows as the whole sequence (the KV-cache trimming rule).
    ws, rs = [5, 12, 20], [1, 2, 4]
    n, nq = 61, 9
    q, k, v = make_inputs(1, nq, n, 4, 4, 8)
    full_out, full_lse = longnet.dilated_attention(
        q, k, v, ws, rs, is_causal=causal, return_lse=True
    )
    first_query = n - nq
    keep = min(first_query // w * w for w in ws)
    assert keep > 0
    out, lse = longnet.dilated_attention(
        q, k[:, keep:], v[:, keep:], ws, rs, is_causal=causal, return_lse=True, position_offset=keep
    )
    torch.testing.assert_close(out, full_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, full_lse, atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------- padded rows ----


@pytest.mark.parametrize("side", ["right", "left", "both"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_padded_row_equals_the_sequence_alone(side, causal):
    # Each row of a padded batch (values, lse and gradients) equals its sequence run
    # alone without padding; padded query rows are out = 0, lse = -inf with zero
    # gradients, padded keys get zero gradients.
    ws, rs, h, hk, d = [4, 8, 16], [1, 2, 4], 4, 2, 8
    lengths = [23, 16, 9]
    n = 27
    seqs = [make_inputs(1, m, m, h, hk, d, seed=10 + i) for i, m in enumerate(lengths)]
    # Keys at [start, start + m) of each row; queries bottom-right aligned to the row's
    # key_end, i.e. the sequence's queries are the last m query rows.
    q = torch.zeros(len(lengths), n, h, d, dtype=torch.float64)
    k = torch.zeros(len(lengths), n, hk, d, dtype=torch.float64)
    v = torch.zeros_like(k)
    starts, ends = [], []
    for i, (m, (sq, sk, sv)) in enumerate(zip(lengths, seqs)):
        start = {"right": 0, "left": n - m, "both": (n - m) // 2}[side]
        starts.append(start)
        ends.append(start + m)
        q[i, n - m :] = sq
        k[i, start : start + m], v[i, start : start + m] = sk, sv
    q, k, v = [t.requires_grad_() for t in (q, k, v)]
    out, lse = longnet.dilated_attention(
        q,
        k,
        v,
        ws,
        rs,
        is_causal=causal,
        return_lse=True,
        key_start=torch.tensor(starts),
        key_end=torch.tensor(ends),
    )
    gen = torch.Generator().manual_seed(3)
    w_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    loss = (out * w_out).sum() + torch.where(torch.isfinite(lse), lse, 0).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    for i, (m, (sq, sk, sv)) in enumerate(zip(lengths, seqs)):
        s, e, pad = starts[i], ends[i], n - m
        o1, l1 = longnet.dilated_attention(sq, sk, sv, ws, rs, is_causal=causal, return_lse=True)
        loss1 = (o1 * w_out[i : i + 1, pad:]).sum() + torch.where(torch.isfinite(l1), l1, 0).sum()
        g1 = torch.autograd.grad(loss1, (sq, sk, sv))
        torch.testing.assert_close(out[i, pad:], o1[0], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(lse[i, :, pad:], l1[0], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(dq[i, pad:], g1[0][0], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(dk[i, s:e], g1[1][0], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(dv[i, s:e], g1[2][0], atol=1e-12, rtol=1e-12)
        # Padding: query rows before the sequence, keys outside [s, e).
        assert (out[i, :pad] == 0).all() and torch.isneginf(lse[i, :, :pad]).all()
        assert (dq[i, :pad] == 0).all()
        assert (dk[i, :s] == 0).all() and (dk[i, e:] == 0).all()
        assert (dv[i, :s] == 0).all() and (dv[i, e:] == 0).all()


def test_key_ranges_combine_with_position_offset():
    # A row [start, end) at position_offset P equals its keys alone at offset P.
    ws, rs = [5, 10], [1, 2]
    q, k, v = make_inputs(2, 6, 20, 2, 2, 8)
    out, lse = longnet.dilated_attention(
        q,
        k,
        v,
        ws,
        rs,
        is_causal=True,
        return_lse=True,
        position_offset=7,
        key_start=torch.tensor([4, 0]),
        key_end=torch.tensor([15, 20]),
    )
    alone, alone_lse = longnet.dilated_attention(
        q[:1], k[:1, 4:15], v[:1, 4:15], ws, rs, is_causal=True, return_lse=True, position_offset=7
    )
    torch.testing.assert_close(out[:1], alone, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse[:1], alone_lse, atol=1e-12, rtol=1e-12)


def test_int32_key_ranges_and_one_sided_ranges():
    q, k, v = make_inputs(2, 10, 10, 2, 2, 4)
    ws, rs = [4, 8], [1, 2]
    ends64 = torch.tensor([7, 10])
    a = longnet.dilated_attention(q, k, v, ws, rs, key_end=ends64)
    b = longnet.dilated_attention(q, k, v, ws, rs, key_end=ends64.int())
    c = longnet.dilated_attention(
        q, k, v, ws, rs, key_start=torch.zeros(2, dtype=torch.long), key_end=ends64
    )
    assert torch.equal(a, b) and torch.equal(a, c)
    ref, _ = dilated_attention_reference(q, k, v, ws, rs, key_end=ends64)
    torch.testing.assert_close(a, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("engine", ENGINES)
def test_low_precision_padded_batch(engine, dtype):
    # bf16/fp16 with key ranges and an offset against the float64 reference on the
    # same rounded inputs, forward and backward, with tests/test_op.py's format-derived
    # relative-norm bounds (fused: out u, dq and dk 2 u; composed: one more u; lse
    # 1e-5, float32 only; u = 2^-8 bf16, 2^-11 fp16). Rows 0 and 1 share key_start
    # but not key_end (the composition groups neighbouring rows with one key range);
    # row 2's first 6 query rows fall before its key_start.
    # Measured (2026-12-02), bf16: fused out 1.4e-3, dq 2.2e-3; cpu_flash out 1.8e-3,
    # dq 3.5e-3; lse <= 8e-8 everywhere.
    b, nq, nk, h, hk, d = 3, 40, 64, 4, 2, 32
    ws, rs = [8, 16, 32], [1, 2, 4]
    q, k, v = [t.detach().to(dtype).requires_grad_() for t in make_inputs(b, nq, nk, h, hk, d)]
    qr, kr, vr = [t.detach().double().requires_grad_() for t in (q, k, v)]
    kw = dict(
        key_start=torch.tensor([0, 0, 30]), key_end=torch.tensor([50, 64, 64]), position_offset=3
    )
    # Loss weights exact in the output format (out) and in float32 (lse), so both
    # backwards receive the same incoming gradients.
    gen = torch.Generator().manual_seed(2)
    w_out = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(dtype).double()
    w_lse = torch.randn((b, h, nq), generator=gen, dtype=torch.float64).float().double()

    def loss(out, lse):
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        return (out.double() * w_out).sum() + (lse.double() * w_lse).sum()

    with longnet.use_engine(engine):
        out, lse = longnet.dilated_attention(q, k, v, ws, rs, is_causal=True, return_lse=True, **kw)
        assert longnet.last_engine() == engine
        grads = torch.autograd.grad(loss(out, lse), (q, k, v))
        assert longnet.last_engine() == engine
    ref_out, ref_lse = dilated_attention_reference(qr, kr, vr, ws, rs, is_causal=True, **kw)
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), (qr, kr, vr))
    finite = torch.isfinite(ref_lse)
    assert not finite[2, :, :6].any() and finite[2, :, 6:].all()
    assert torch.equal(finite, torch.isfinite(lse))
    assert torch.equal(out[2, :6], torch.zeros_like(out[2, :6]))
    tol = low_precision_tolerances(dtype, composed=engine != "fused", engine=engine)
    errors = {
        "lse": ((lse.double() - ref_lse)[finite].abs().max() / ref_lse[finite].abs().max()).item()
    }
    for name, got, want in [("out", out, ref_out)] + list(
        zip(("dq", "dk", "dv"), grads, ref_grads)
    ):
        assert got.dtype == dtype
        errors[name] = ((got.double() - want).norm() / want.norm()).item()
    assert all(errors[name] < tol[name] for name in errors), (errors, tol)


# ------------------------------------------------- autograd, compile, opcheck ----


def test_gradcheck_with_offset_and_ranges():
    q, k, v = make_inputs(2, 7, 12, 2, 1, 3)
    kw = dict(position_offset=3, key_start=torch.tensor([2, 0]), key_end=torch.tensor([12, 9]))

    def fn(q, k, v):
        out, lse = longnet.dilated_attention(
            q, k, v, [4, 6], [1, 2], is_causal=True, return_lse=True, **kw
        )
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


def test_opcheck_with_offset_and_ranges():
    q, k, v = make_inputs(2, 11, 16, 4, 2, 8, dtype=torch.float32)
    q, k, v = q.detach(), k.detach(), v.detach()
    ks, ke = torch.tensor([0, 3]), torch.tensor([16, 13])
    for causal in (False, True):
        torch.library.opcheck(
            torch.ops.longnet.dilated_attention_fwd.default,
            (q, k, v, [4, 8], [1, 2], causal, 0.3, 5, ks, ke),
        )
    out, lse = torch.ops.longnet.dilated_attention_fwd(
        q, k, v, [4, 8], [1, 2], True, 0.3, 5, ks, ke
    )
    torch.library.opcheck(
        torch.ops.longnet.dilated_attention_bwd.default,
        (
            torch.randn_like(out),
            torch.randn_like(lse),
            q,
            k,
            v,
            out,
            lse,
            [4, 8],
            [1, 2],
            True,
            0.3,
            5,
            ks,
            ke,
        ),
    )


def test_torch_compile_fullgraph_with_offset_and_ranges():
    q, k, v = [t.detach().float().requires_grad_() for t in make_inputs(2, 12, 20, 4, 2, 8)]
    ks, ke = torch.tensor([0, 5]), torch.tensor([18, 20])

    def fn(q, k, v, ks, ke):
        out, lse = longnet.dilated_attention(
            q,
            k,
            v,
            [4, 8],
            [1, 2],
            is_causal=True,
            return_lse=True,
            position_offset=6,
            key_start=ks,
            key_end=ke,
        )
        return out, lse

    def loss(out, lse):
        return out.sum() * 2 + torch.where(torch.isfinite(lse), lse, 0).sum()

    check_compiled_matches_eager(fn, (q, k, v, ks, ke), loss, (q, k, v))


# ------------------------------------------------------------- bad arguments ----

BAD = {
    "negative_offset": (dict(position_offset=-1), "position_offset must be >= 0"),
    "float_offset": (dict(position_offset=2.5), "position_offset must be an int"),
    "bool_offset": (dict(position_offset=True), "position_offset must be an int, got the bool"),
    "start_shape": (
        dict(key_start=torch.zeros(3, dtype=torch.long)),
        "key_start must have shape (B,)",
    ),
    "end_2d": (dict(key_end=torch.zeros(2, 1, dtype=torch.long)), "key_end must have shape (B,)"),
    "start_float": (dict(key_start=torch.zeros(2)), "key_start must be an int32 or int64"),
    "start_list": (dict(key_start=[0, 0]), "key_start must be a torch.Tensor"),
    "end_past_nk": (dict(key_end=torch.tensor([16, 17])), "key_end[1] = 17"),
    "start_negative": (dict(key_start=torch.tensor([-1, 0])), "key_start[0] = -1"),
    "start_after_end": (
        dict(key_start=torch.tensor([0, 9]), key_end=torch.tensor([16, 8])),
        "key_start[1] = 9, key_end[1] = 8",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_positions_raise_clear_errors(name):
    kwargs, message = BAD[name]
    q = torch.randn(2, 16, 2, 4)
    with pytest.raises(ValueError, match=re.escape(message)):
        longnet.dilated_attention(q, q, q, [4], [1], **kwargs)


@pytest.mark.parametrize("bad", [[2.5], [True], [4.0], ["4"]])
def test_non_integral_patterns_raise(bad):
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=re.escape("segment_lengths[0] must be an int")):
        longnet.dilated_attention(q, q, q, bad, [1])
    with pytest.raises(ValueError, match=re.escape("dilation_rates[0] must be an int")):
        longnet.dilated_attention(q, q, q, [4], bad)


def test_direct_op_call_checks_positions():
    # The C++ operators check what the Python wrapper checks (no out-of-bounds reads).
    q = torch.randn(2, 16, 2, 4)
    op = torch.ops.longnet.dilated_attention_fwd
    with pytest.raises(RuntimeError, match="position_offset must be >= 0"):
        op(q, q, q, [4], [1], False, 0.5, -3)
    with pytest.raises(RuntimeError, match=re.escape("key_end[0] = 99")):
        op(q, q, q, [4], [1], False, 0.5, 0, None, torch.tensor([99, 3]))
    with pytest.raises(RuntimeError, match=re.escape("key_start must have shape (B,)")):
        op(q, q, q, [4], [1], False, 0.5, 0, torch.tensor([0]), None)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        op(q, q, q, [4], [1], False, 0.5, 0, torch.tensor([0.0, 1.0]), None)
