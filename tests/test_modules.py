"""Tests of longnet.modules: DilatedAttention, MultiheadDilatedAttention, KVCache."""

import pytest
import torch

import longnet
from longnet.modules import (
    DilatedAttention,
    KVCache,
    MultiheadDilatedAttention,
    RotaryEmbedding,
)
from longnet.packing import cu_seqlens_from_lengths
from longnet.reference import dilated_attention_reference

WS, RS = [4, 8, 16], [1, 2, 4]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one thread avoids OpenMP overhead on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mha(**kw):
    args = dict(
        embed_dim=32, num_heads=4, segment_lengths=WS, dilation_rates=RS, dtype=torch.float64
    )
    args.update(kw)
    torch.manual_seed(0)
    return MultiheadDilatedAttention(**args)


def test_dilated_attention_module_matches_reference():
    torch.manual_seed(0)
    q = torch.randn(2, 24, 4, 8, dtype=torch.float64)
    k = torch.randn(2, 24, 2, 8, dtype=torch.float64)
    v = torch.randn(2, 24, 2, 8, dtype=torch.float64)
    mod = DilatedAttention(WS, RS, is_causal=True, scale=0.3)
    out, lse = mod(q, k, v, return_lse=True)
    ref_out, ref_lse = dilated_attention_reference(q, k, v, WS, RS, is_causal=True, scale=0.3)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    # is_causal can be overridden per call.
    out_nc = mod(q, k, v, is_causal=False)
    ref_nc, _ = dilated_attention_reference(q, k, v, WS, RS, is_causal=False, scale=0.3)
    torch.testing.assert_close(out_nc, ref_nc)
    r = repr(mod)
    assert "segment_lengths=[4, 8, 16]" in r and "dilation_rates=[1, 2, 4]" in r
    assert "is_causal=True" in r and "scale=0.3" in r


def test_dilated_attention_module_rejects_bad_patterns():
    with pytest.raises(ValueError, match="dilation_rates"):
        DilatedAttention([4, 8], [1])
    with pytest.raises(ValueError, match="must not exceed"):
        DilatedAttention([4], [8])
    with pytest.raises(ValueError, match="scale"):
        DilatedAttention([4], [1], scale=float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_mha_shapes_and_dtypes(dtype, num_kv_heads):
    mha = _mha(num_kv_heads=num_kv_heads, dtype=dtype)
    x = torch.randn(3, 37, 32, dtype=dtype)
    y = mha(x)
    assert y.shape == (3, 37, 32) and y.dtype == dtype
    assert torch.isfinite(y.float()).all()
    assert mha.k_proj.out_features == num_kv_heads * 8
    y.float().sum().backward()
    assert (
        mha.q_proj.weight.grad is not None and torch.isfinite(mha.q_proj.weight.grad.float()).all()
    )


@pytest.mark.parametrize("offset", [0, 5])
def test_mha_matches_manual_computation(offset):
    """Projections + rotary + operator + output projection, written out by hand.
    With offset 5 (not a multiple of any segment length) this catches an offset that
    reaches the rotary angles but not the operator's segments, or neither."""
    mha = _mha(num_kv_heads=2, position_encoding="rotary")
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    q = mha.q_proj(x).view(2, 20, 4, 8)
    k = mha.k_proj(x).view(2, 20, 2, 8)
    v = mha.v_proj(x).view(2, 20, 2, 8)
    pos = torch.arange(offset, offset + 20, dtype=torch.float64)
    inv = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    ang = pos[:, None] * inv[None, :]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]

    def rot(t):
        a, b = t[..., :4], t[..., 4:]
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)

    out, _ = dilated_attention_reference(
        rot(q), rot(k), v, WS, RS, is_causal=True, position_offset=offset
    )
    expected = mha.out_proj(out.reshape(2, 20, 32))
    got = mha(x) if offset == 0 else mha(x, position_offset=offset)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    if offset:
        # The offset moves the segment boundaries: segments counted from x[:, 0]
        # would give another result.
        unshifted, _ = dilated_attention_reference(rot(q), rot(k), v, WS, RS, is_causal=True)
        assert (mha.out_proj(unshifted.reshape(2, 20, 32)) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("pe", ["rotary", "xpos", None])
def test_mha_is_causal(pe):
    mha = _mha(position_encoding=pe, num_kv_heads=2)
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    base = mha(x)
    t = 23
    x2 = x.clone()
    x2[:, t] += torch.randn(2, 32, dtype=torch.float64)
    changed = mha(x2)
    torch.testing.assert_close(changed[:, :t], base[:, :t], rtol=0, atol=1e-12)
    assert (changed[:, t] - base[:, t]).abs().max() > 1e-6


@pytest.mark.parametrize("pe", ["rotary", "xpos"])
def test_position_offset_by_whole_periods_changes_nothing(pe):
    """Rotary and xPos depend on relative positions only and the segments repeat with
    lcm(WS) = 16: shifting every position by 1024 leaves the output unchanged, while
    the rotation of q and k does change (so the offset is really applied)."""
    mha = _mha(position_encoding=pe)
    x = torch.randn(1, 32, 32, dtype=torch.float64)
    a = mha(x)
    b = mha(x, position_offset=1024)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    rot = mha.rotary
    q = torch.randn(1, 32, 4, 8, dtype=torch.float64)
    assert not torch.allclose(
        rot.rotate(q, torch.arange(32)), rot.rotate(q, torch.arange(1024, 1056))
    )


def test_rotary_is_a_rotation_with_relative_inner_products():
    rot = RotaryEmbedding(16)
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def dot(m, n):
        return (rot.rotate(q, torch.tensor([m])) * rot.rotate(k, torch.tensor([n]))).sum()

    torch.testing.assert_close(rot.rotate(q, torch.tensor([123])).norm(), q.norm())
    torch.testing.assert_close(dot(7, 3), dot(1007, 1003))
    torch.testing.assert_close(dot(10**6 + 5, 10**6), dot(5, 0))
    assert not torch.allclose(dot(7, 3), dot(7, 4))
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(7)


def _run_cached(mha, x, chunks, offset=None):
    """Feed ``x`` through ``mha`` chunk by chunk with a KV cache; check after every
    step that the cache keeps exactly the keys the next queries can reach."""
    cache = mha.new_cache()
    outs, t = [], 0
    base = 0 if offset is None else offset
    for i, n in enumerate(chunks):
        outs.append(mha(x[:, t : t + n], cache=cache, position_offset=offset if i == 0 else None))
        p = base + t  # absolute position of this chunk's first query
        # Keys before min_i floor(p / w_i) * w_i are unreachable and dropped (never
        # before the first token); catches a cache that keeps whole lcm blocks.
        want_start = max(base, min((p // w) * w for w in mha.segment_lengths))
        assert cache.start == want_start, (t, cache)
        assert len(cache) <= max(mha.segment_lengths) - 1 + n
        t += n
        assert cache.end == base + t
    assert t == x.shape[1]
    return torch.cat(outs, dim=1), cache


CACHE_PATTERNS = {
    "geometric": ([4, 8, 16], [1, 2, 4]),
    # lcm(3, 4) = 12 is large against max(w) = 4: a cache trimming in lcm blocks
    # would hold up to 11 old keys instead of at most 3.
    "non_dividing": ([3, 4], [1, 2]),
}


@pytest.mark.parametrize("pattern", list(CACHE_PATTERNS))
@pytest.mark.parametrize("pe", ["rotary", "xpos", None])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_cached_decoding_equals_full_forward(pattern, pe, num_kv_heads):
    """Prefill, single-token and multi-token steps against the cache give the output
    of one full forward at every step, far past the largest segment and the lcm,
    while the cache holds at most max(w) - 1 old keys."""
    ws, rs = CACHE_PATTERNS[pattern]
    mha = _mha(
        position_encoding=pe, num_kv_heads=num_kv_heads, segment_lengths=ws, dilation_rates=rs
    )
    n = 75
    x = torch.randn(2, n, 32, dtype=torch.float64)
    full = mha(x)
    chunks = [5] + [1] * 30 + [3, 7, 2] + [1] * 28
    inc, cache = _run_cached(mha, x, chunks)
    torch.testing.assert_close(inc, full, rtol=1e-10, atol=1e-12)
    assert cache.end == 75 and cache.start == min((74 // w) * w for w in ws)


@pytest.mark.parametrize("pe", ["rotary", "xpos"])
def test_cache_starting_at_position_offset(pe):
    """position_offset with an empty cache starts it there: the steps equal a full
    forward with the same offset (5 is on no segment boundary, so segments counted
    from the cache's first key would differ)."""
    mha = _mha(position_encoding=pe, num_kv_heads=2, segment_lengths=[3, 4], dilation_rates=[1, 2])
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    full = mha(x, position_offset=5)
    inc, cache = _run_cached(mha, x, [4] + [1] * 36, offset=5)
    torch.testing.assert_close(inc, full, rtol=1e-10, atol=1e-12)
    assert (full - mha(x)).abs().max() > 1e-3  # the offset matters here


def test_cache_rejects_a_conflicting_position_offset():
    """An offset that contradicts the cache used to be ignored silently."""
    mha = _mha()
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    cache = mha.new_cache()
    mha(x[:, :4], cache=cache)
    with pytest.raises(ValueError, match=r"position_offset \(7\) must equal .* \(4\)"):
        mha(x[:, 4:5], cache=cache, position_offset=7)
    assert cache.end == 4  # nothing was appended
    mha(x[:, 4:5], cache=cache, position_offset=4)  # restating the position is fine
    assert cache.end == 5
    with pytest.raises(ValueError, match="position_offset must be >= 0"):
        mha(x, position_offset=-1)


def test_cache_trimmed_one_key_too_far_is_caught(monkeypatch):
    """The equality check above is sharp: a cache that drops the first reachable key
    too gives a different output."""
    mha = _mha(segment_lengths=[3, 4], dilation_rates=[1, 2])
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    full = mha(x)
    original = KVCache.reachable_from
    monkeypatch.setattr(KVCache, "reachable_from", lambda self, p: min(original(self, p) + 1, p))
    cache = mha.new_cache()
    inc = torch.cat([mha(x[:, t : t + 1], cache=cache) for t in range(30)], dim=1)
    assert (inc - full).abs().max() > 1e-3


def test_kv_cache_bookkeeping():
    cache = KVCache([3, 4])
    k = torch.randn(1, 10, 2, 4)
    ck, cv = cache.update(k, k)
    assert ck.shape[1] == 10 and (cache.start, cache.end) == (0, 10)
    ck, _ = cache.update(k[:, :3], k[:, :3])
    # The next queries start at position 10: segments [9, 12) (w = 3) and [8, 12)
    # (w = 4); keys from 8 on are kept, although lcm(3, 4) = 12 > 10.
    assert (cache.start, cache.end) == (8, 13) and ck.shape[1] == 5
    torch.testing.assert_close(ck[:, :2], k[:, 8:10])
    assert cache.reachable_from(13) == 12 and cache.reachable_from(24) == 24
    cache.reorder(torch.tensor([0, 0]))
    assert cache.k.shape[0] == 2
    no_trim = KVCache([3, 4], trim=False)
    no_trim.update(k, k)
    no_trim.update(k, k)
    assert no_trim.start == 0 and len(no_trim) == 20
    assert KVCache(8).segment_lengths == (8,)  # an int is one segment length
    late = KVCache([4], start=6)
    late.update(k[:, :1], k[:, :1])
    assert (late.start, late.end) == (6, 7)
    assert "segment_lengths=[3, 4]" in repr(cache)
    with pytest.raises(ValueError, match="segment_lengths"):
        KVCache(0)
    with pytest.raises(ValueError, match="segment_lengths"):
        KVCache(True)  # a bool is not a segment length (it used to fail as not iterable)
    with pytest.raises(ValueError, match="start"):
        KVCache([4], start=-1)


def test_mha_errors_and_repr():
    with pytest.raises(ValueError, match="num_heads"):
        MultiheadDilatedAttention(30, 4, WS, RS)
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiheadDilatedAttention(32, 4, WS, RS, num_kv_heads=3)
    with pytest.raises(ValueError, match="position_encoding"):
        MultiheadDilatedAttention(32, 4, WS, RS, position_encoding="alibi")
    with pytest.raises(ValueError, match="dropout"):
        MultiheadDilatedAttention(32, 4, WS, RS, dropout=1.5)
    mha = MultiheadDilatedAttention(32, 4, WS, RS, is_causal=False)
    with pytest.raises(ValueError, match="causal"):
        mha(torch.randn(1, 4, 32), cache=mha.new_cache())
    with pytest.raises(ValueError, match=r"\(B, N, 32\)"):
        mha(torch.randn(4, 32))
    r = repr(MultiheadDilatedAttention(32, 4, WS, RS, num_kv_heads=2, sub_ln=True))
    assert "num_kv_heads=2" in r and "position_encoding='rotary'" in r and "inner_norm" in r


def test_sub_ln_and_dropout():
    mha = _mha(sub_ln=True, dropout=0.5)
    assert isinstance(mha.inner_norm, torch.nn.LayerNorm)
    x = torch.randn(1, 16, 32, dtype=torch.float64)
    mha.eval()
    # Sub-LN sits between the operator and the output projection: check against
    # the reference on the module's projections and a LayerNorm written out by hand
    # (catches a missing or misplaced norm, or dropout applied in eval mode).
    with torch.no_grad():
        mha.inner_norm.weight.uniform_(0.5, 1.5)
        mha.inner_norm.bias.uniform_(-0.5, 0.5)
    rot = mha.rotary
    pos = torch.arange(16)
    q = rot.rotate(mha.q_proj(x).view(1, 16, 4, 8), pos)
    k = rot.rotate(mha.k_proj(x).view(1, 16, 4, 8), pos)
    v = mha.v_proj(x).view(1, 16, 4, 8)
    h, _ = dilated_attention_reference(q, k, v, WS, RS, is_causal=True)
    h = h.reshape(1, 16, 32)
    mean = h.mean(-1, keepdim=True)
    var = h.var(-1, unbiased=False, keepdim=True)
    normed = (h - mean) / torch.sqrt(var + 1e-5) * mha.inner_norm.weight + mha.inner_norm.bias
    torch.testing.assert_close(mha(x), mha.out_proj(normed), rtol=1e-10, atol=1e-12)
    mha.train()
    torch.manual_seed(1)
    a = mha(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, mha(x))


def test_mha_gradcheck():
    mha = MultiheadDilatedAttention(8, 2, [2, 4], [1, 2], num_kv_heads=1, dtype=torch.float64)
    x = torch.randn(1, 9, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mha(t), (x,), eps=1e-6, atol=1e-6)


def test_exports():
    for name in (
        "DilatedAttention",
        "MultiheadDilatedAttention",
        "KVCache",
        "LongNetLM",
        "LongNetConfig",
        "ByteTokenizer",
    ):
        assert hasattr(longnet, name) and name in longnet.__all__


# ------------------------------------------------------------------ packed documents

# Lengths with an empty document, documents shorter than the smallest segment,
# and documents longer than the largest one (max(WS) = 16).
DOC_LENGTHS = [5, 0, 17, 1, 40, 9]


def _bounds(lengths):
    cu = cu_seqlens_from_lengths(lengths)
    return cu, [(int(a), int(b)) for a, b in zip(cu[:-1], cu[1:])]


@pytest.mark.parametrize("is_causal", [True, False])
def test_dilated_attention_module_packed_documents_equal_each_alone(is_causal):
    """Packed q/k/v with cu_seqlens_q != cu_seqlens_k (Nq <= Nk per document, GQA):
    out, lse and the q/k/v gradients equal the float64 reference run on each
    document alone. Catches a module that drops the boundaries (cross-document
    attention: O(1) differences) or passes only one of them."""
    torch.manual_seed(0)
    nk = [8, 0, 20, 3, 37, 16]
    nq = [min(n, m) for n, m in zip(nk, [8, 0, 11, 3, 37, 2])]
    cu_q, docs_q = _bounds(nq)
    cu_k, docs_k = _bounds(nk)
    q = torch.randn(1, sum(nq), 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, sum(nk), 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, sum(nk), 2, 8, dtype=torch.float64, requires_grad=True)
    mod = DilatedAttention(WS, RS, is_causal=is_causal, scale=0.3)
    out, lse = mod(q, k, v, return_lse=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref_grads = [torch.zeros_like(t) for t in (q, k, v)]
    for (qa, qb), (ka, kb) in zip(docs_q, docs_k):
        if qb == qa:
            continue
        parts = (q[:, qa:qb], k[:, ka:kb], v[:, ka:kb])
        ref_out, ref_lse = dilated_attention_reference(
            *parts, WS, RS, is_causal=is_causal, scale=0.3
        )
        # float64 throughout: ~1e-15 per operation, a few hundred operations deep.
        torch.testing.assert_close(out[:, qa:qb], ref_out, rtol=0, atol=1e-12)
        torch.testing.assert_close(lse[:, :, qa:qb], ref_lse, rtol=0, atol=1e-12)
        dq, dk, dv = torch.autograd.grad((ref_out * g[:, qa:qb]).sum(), parts)
        ref_grads[0][:, qa:qb] += dq
        ref_grads[1][:, ka:kb] += dk
        ref_grads[2][:, ka:kb] += dv
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def _packed_and_alone(mod, x, cu, docs, g):
    """Outputs and gradients (input and parameters) of ``mod`` on the packed row and on
    each document alone; the loss is ``sum(out * g)`` in both."""
    mod.zero_grad()
    x = x.detach().requires_grad_(True)
    out = mod(x, cu_seqlens=cu)
    (out * g).sum().backward()
    packed = (out.detach(), x.grad, {n: p.grad.clone() for n, p in mod.named_parameters()})
    mod.zero_grad()
    xs = x.detach().requires_grad_(True)
    outs = []
    for a, b in docs:
        if b > a:
            o = mod(xs[:, a:b])
            (o * g[:, a:b]).sum().backward()
            outs.append(o.detach())
    alone = (torch.cat(outs, 1), xs.grad, {n: p.grad.clone() for n, p in mod.named_parameters()})
    return packed, alone


@pytest.mark.parametrize(
    "kw",
    [
        dict(position_encoding="rotary"),
        dict(position_encoding="xpos", num_kv_heads=2),
        dict(position_encoding=None, is_causal=False),
        dict(position_encoding="rotary", is_causal=False, sub_ln=True, num_kv_heads=1),
    ],
)
def test_multihead_packed_documents_equal_each_alone(kw):
    """Float64: the packed row gives each document's output, input gradient and
    parameter gradients (summed over the documents) as if it ran alone, to 1e-12.
    Catches attention across documents and segments that do not restart at each
    document. (Rotary and xPos scores depend on distances only, so positions that do
    not restart change rounding alone: test_multihead_packed_positions_restart checks
    those directly.)"""
    mod = _mha(**kw)
    cu, docs = _bounds(DOC_LENGTHS)
    torch.manual_seed(1)
    x = torch.randn(1, sum(DOC_LENGTHS), 32, dtype=torch.float64)
    g = torch.randn(1, sum(DOC_LENGTHS), 32, dtype=torch.float64)
    packed, alone = _packed_and_alone(mod, x, cu, docs, g)
    torch.testing.assert_close(packed[0], alone[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(packed[1], alone[1], rtol=0, atol=1e-12)
    for name, grad in packed[2].items():
        torch.testing.assert_close(grad, alone[2][name], rtol=1e-12, atol=1e-12, msg=name)
    # The boundaries matter here: without them the outputs differ at O(1).
    assert (mod(x) - alone[0]).abs().max() > 1e-2


@pytest.mark.parametrize("position_encoding", ["rotary", "xpos"])
def test_multihead_packed_positions_restart(position_encoding, monkeypatch):
    """The rotary angles (and xPos factors) of every token are those of its position
    inside its own document (plus position_offset), and xPos centres each document on
    itself as a lone run does. Catches positions counted along the packed row."""
    mod = _mha(position_encoding=position_encoding)
    seen = []
    rotate, xpos_scale = mod.rotary.rotate, mod.rotary.xpos_scale
    monkeypatch.setattr(
        mod.rotary, "rotate", lambda x, pos: seen.append(("rot", pos.clone())) or rotate(x, pos)
    )

    def scale(pos, center, sign, dtype):
        seen.append(("xpos", pos - center))
        return xpos_scale(pos, center, sign, dtype)

    monkeypatch.setattr(mod.rotary, "xpos_scale", scale)
    cu, docs = _bounds(DOC_LENGTHS)
    mod(torch.randn(1, sum(DOC_LENGTHS), 32, dtype=torch.float64), cu_seqlens=cu, position_offset=3)
    inside = torch.cat([torch.arange(b - a) for a, b in docs])
    from_centre = torch.cat([torch.arange(b - a) - (b - a) // 2 for a, b in docs])
    kinds = [kind for kind, _ in seen]
    assert kinds == ["rot", "rot"] + (["xpos", "xpos"] if position_encoding == "xpos" else [])
    for kind, values in seen:
        torch.testing.assert_close(values, inside + 3 if kind == "rot" else from_centre)


def test_multihead_packed_documents_float32_within_the_alone_error():
    """Float32 (xPos, GQA, causal): the packed row's error against the documents run
    alone in float64 is at most twice the error of the documents run alone in float32
    (the same float32 operations, possibly summed in another order) plus 8 float32 ulps
    of the output's scale."""
    mod64 = _mha(position_encoding="xpos", num_kv_heads=2)
    mod32 = _mha(position_encoding="xpos", num_kv_heads=2, dtype=torch.float32)
    mod32.load_state_dict({n: p.float() for n, p in mod64.state_dict().items()})
    cu, docs = _bounds(DOC_LENGTHS)
    torch.manual_seed(1)
    x = torch.randn(1, sum(DOC_LENGTHS), 32, dtype=torch.float64)
    g = torch.randn(1, sum(DOC_LENGTHS), 32, dtype=torch.float64)
    _, truth = _packed_and_alone(mod64, x, cu, docs, g)
    packed32, alone32 = _packed_and_alone(mod32, x.float(), cu, docs, g.float())
    eps = torch.finfo(torch.float32).eps
    pairs = [(packed32[0], alone32[0], truth[0]), (packed32[1], alone32[1], truth[1])]
    pairs += [(packed32[2][n], alone32[2][n], truth[2][n]) for n in truth[2]]
    for got, ref32, ref in pairs:
        alone_err = (ref32.double() - ref).abs().max().item()
        bound = 2 * alone_err + 8 * eps * ref.abs().max().item()
        assert (got.double() - ref).abs().max().item() <= bound


def test_multihead_packed_documents_reject_bad_boundaries():
    mod = _mha()
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    good = torch.tensor([0, 5, 12])
    with pytest.raises(ValueError, match=r"shape \(1, N, E\)"):
        mod(x.expand(2, -1, -1), cu_seqlens=good)
    with pytest.raises(ValueError, match=r"\[-1\] must equal the number of packed tokens \(12\)"):
        mod(x, cu_seqlens=torch.tensor([0, 5, 11]))
    with pytest.raises(ValueError, match=r"\[0\] must be 0"):
        mod(x, cu_seqlens=torch.tensor([1, 5, 12]))
    with pytest.raises(ValueError, match="nondecreasing"):
        mod(x, cu_seqlens=torch.tensor([0, 7, 5, 12]))
    with pytest.raises(ValueError, match="int32 or int64"):
        mod(x, cu_seqlens=good.float())
    with pytest.raises(ValueError, match=r"shape \(S\+1,\)"):
        mod(x, cu_seqlens=good[None])
    with pytest.raises(ValueError, match="KV cache"):
        mod(x, cu_seqlens=good, cache=mod.new_cache())
