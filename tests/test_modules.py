"""Tests of longnet.modules: DilatedAttention, MultiheadDilatedAttention, KVCache."""

import math

import pytest
import torch

import longnet
from longnet.modules import (DilatedAttention, KVCache, MultiheadDilatedAttention,
                             RotaryEmbedding, pattern_period)
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
    args = dict(embed_dim=32, num_heads=4, segment_lengths=WS, dilation_rates=RS,
                dtype=torch.float64)
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
    assert mha.q_proj.weight.grad is not None and torch.isfinite(mha.q_proj.weight.grad.float()).all()


def test_mha_matches_manual_computation():
    """Projections + rotary + operator + output projection, written out by hand."""
    mha = _mha(num_kv_heads=2, position_encoding="rotary")
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    q = mha.q_proj(x).view(2, 20, 4, 8)
    k = mha.k_proj(x).view(2, 20, 2, 8)
    v = mha.v_proj(x).view(2, 20, 2, 8)
    pos = torch.arange(20, dtype=torch.float64)
    inv = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    ang = pos[:, None] * inv[None, :]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]

    def rot(t):
        a, b = t[..., :4], t[..., 4:]
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)

    out, _ = dilated_attention_reference(rot(q), rot(k), v, WS, RS, is_causal=True)
    expected = mha.out_proj(out.reshape(2, 20, 32))
    torch.testing.assert_close(mha(x), expected)


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
def test_position_offset_only_shifts_absolute_positions(pe):
    """Rotary and xPos depend on relative positions only: shifting every position by
    the same offset leaves the output unchanged, while the rotation of q and k does
    change (so the offset is really applied)."""
    mha = _mha(position_encoding=pe)
    x = torch.randn(1, 32, 32, dtype=torch.float64)
    a = mha(x)
    b = mha(x, position_offset=1000)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    rot = mha.rotary
    q = torch.randn(1, 32, 4, 8, dtype=torch.float64)
    assert not torch.allclose(rot.rotate(q, torch.arange(32)), rot.rotate(q, torch.arange(1000, 1032)))


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


def _run_cached(mha, x, chunks):
    cache = mha.new_cache()
    outs, t = [], 0
    for n in chunks:
        outs.append(mha(x[:, t:t + n], cache=cache))
        # Keys before the period block of the chunk's first query are dropped.
        assert cache.start == (t // cache.period) * cache.period
        t += n
        assert cache.end == t
    assert t == x.shape[1]
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("pe", ["rotary", "xpos", None])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_cached_decoding_equals_full_forward(pe, num_kv_heads):
    """Prefill, single-token and multi-token steps against the cache give the same
    output as one full forward, far past the largest segment (16) and the period."""
    mha = _mha(position_encoding=pe, num_kv_heads=num_kv_heads)
    n = 75
    x = torch.randn(2, n, 32, dtype=torch.float64)
    full = mha(x)
    chunks = [5] + [1] * 30 + [3, 7, 2] + [1] * 28
    inc, cache = _run_cached(mha, x, chunks)
    torch.testing.assert_close(inc, full, rtol=1e-10, atol=1e-12)
    # Keys older than the current period block were dropped, start stays aligned.
    assert cache.start == 64 and cache.end == 75 and len(cache) == 11


def test_cache_with_unaligned_periods():
    """lcm(6, 4) = 12: the cache trims in multiples of 12, keeping every pattern's
    segment boundaries."""
    mha = _mha(segment_lengths=[6, 4], dilation_rates=[2, 1])
    assert pattern_period([6, 4]) == 12
    x = torch.randn(1, 41, 32, dtype=torch.float64)
    inc, cache = _run_cached(mha, x, [1] * 41)
    torch.testing.assert_close(inc, mha(x), rtol=1e-10, atol=1e-12)
    assert cache.start == 36


def test_kv_cache_bookkeeping():
    cache = KVCache(8)
    k = torch.randn(1, 10, 2, 4)
    ck, cv = cache.update(k, k)
    assert ck.shape[1] == 10 and (cache.start, cache.end) == (0, 10)
    ck, _ = cache.update(k[:, :3], k[:, :3])
    # The next queries start at position 10, in the block [8, 16): keys 8.. are kept.
    assert (cache.start, cache.end) == (8, 13) and ck.shape[1] == 5
    torch.testing.assert_close(ck[:, :2], k[:, 8:10])
    cache.reorder(torch.tensor([0, 0]))
    assert cache.k.shape[0] == 2
    no_trim = KVCache(8, trim=False)
    no_trim.update(k, k)
    no_trim.update(k, k)
    assert no_trim.start == 0 and len(no_trim) == 20
    assert "period=8" in repr(cache)
    with pytest.raises(ValueError, match="period"):
        KVCache(0)


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
    torch.testing.assert_close(mha(x), mha(x))
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
    for name in ("DilatedAttention", "MultiheadDilatedAttention", "KVCache", "LongNetLM",
                 "LongNetConfig", "ByteTokenizer"):
        assert hasattr(longnet, name) and name in longnet.__all__
    assert math.lcm(*WS) == pattern_period(WS)
