"""The gather + SDPA baseline (benchmarks/gather_sdpa.py) against the float64 reference."""

import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.gather_sdpa import _SegmentAttention, gather_sdpa_dilated_attention
from longnet.reference import dilated_attention_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (B, Nq, Nk, H, Hk, D, segment_lengths, dilation_rates, is_causal)
CASES = [
    pytest.param(2, 16, 16, 4, 4, 8, [4, 8], [1, 2], True, id="two-patterns-causal"),
    pytest.param(1, 24, 24, 4, 4, 8, [4, 8, 16], [1, 2, 4], False, id="three-patterns"),
    pytest.param(1, 19, 19, 3, 3, 5, [4, 7, 40], [1, 3, 2], True, id="tails-and-w-over-n"),
    pytest.param(2, 18, 18, 4, 2, 8, [6, 12], [1, 3], True, id="gqa"),
    pytest.param(1, 20, 20, 6, 1, 4, [5, 10], [1, 2], False, id="mqa"),
    pytest.param(1, 7, 21, 4, 2, 8, [4, 8], [1, 2], True, id="decode-nq-lt-nk"),
    pytest.param(1, 1, 13, 2, 2, 4, [4, 8], [1, 2], False, id="single-query"),
    pytest.param(1, 16, 16, 2, 2, 4, [16], [8], False, id="r-above-h"),
    pytest.param(1, 12, 12, 3, 3, 4, [6, 12], [2, 3], True, id="rows-without-keys"),
]


def _inputs(b, nq, nk, h, hk, d, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, nq, h, d, generator=gen, dtype=dtype, requires_grad=True)
    k = torch.randn(b, nk, hk, d, generator=gen, dtype=dtype, requires_grad=True)
    v = torch.randn(b, nk, hk, d, generator=gen, dtype=dtype, requires_grad=True)
    return q, k, v


def _loss(out, lse, gen):
    """A loss on both outputs; rows with lse = -inf only contribute through out."""
    g_out = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=lse.dtype)
    finite = torch.isfinite(lse)
    return (out * g_out).sum() + (torch.where(finite, lse, 0.0) * g_lse).sum()


@pytest.mark.parametrize("b,nq,nk,h,hk,d,ws,rs,causal", CASES)
def test_matches_reference_float64(b, nq, nk, h, hk, d, ws, rs, causal):
    q, k, v = _inputs(b, nq, nk, h, hk, d)
    out_ref, lse_ref = dilated_attention_reference(q, k, v, ws, rs, is_causal=causal)
    out, lse = gather_sdpa_dilated_attention(q, k, v, ws, rs, is_causal=causal, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (b, h, nq) and lse.dtype == torch.float64
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    finite = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[finite], lse_ref[finite], rtol=1e-10, atol=1e-10)

    grads_ref = torch.autograd.grad(
        _loss(out_ref, lse_ref, torch.Generator().manual_seed(1)), (q, k, v)
    )
    grads = torch.autograd.grad(_loss(out, lse, torch.Generator().manual_seed(1)), (q, k, v))
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert torch.isfinite(g).all(), f"d{name} is not finite"
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9, msg=f"d{name} differs")


def test_rows_without_keys_give_zero_and_minus_inf():
    q, k, v = _inputs(1, 12, 12, 3, 3, 4)
    out, lse = gather_sdpa_dilated_attention(q, k, v, [6], [3], return_lse=True)
    empty = torch.isinf(lse)
    assert empty.any() and (lse[empty] < 0).all()
    assert (out.permute(0, 2, 1, 3)[empty] == 0).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_custom_scale_and_float32():
    q, k, v = _inputs(2, 32, 32, 4, 2, 16, dtype=torch.float32)
    ws, rs = [8, 16, 32], [1, 2, 4]
    out, lse = gather_sdpa_dilated_attention(
        q, k, v, ws, rs, is_causal=True, scale=0.3, return_lse=True
    )
    out_ref, lse_ref = dilated_attention_reference(
        q.double(), k.double(), v.double(), ws, rs, is_causal=True, scale=0.3
    )
    assert lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_segment_attention_gradcheck(causal):
    """Gradients of both outputs, including the folded-in lse gradient."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(1, 4, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    )
    assert torch.autograd.gradcheck(
        lambda a, b, c: _SegmentAttention.apply(a, b, c, causal, 0.7), (q, k, v)
    )


def test_rejects_bad_input():
    q, k, v = _inputs(1, 8, 8, 2, 2, 4)
    with pytest.raises(ValueError, match="dilation_rates"):
        gather_sdpa_dilated_attention(q, k, v, [4], [8])
    with pytest.raises(ValueError, match="same length"):
        gather_sdpa_dilated_attention(q, k, v, [4, 8], [1])
    with pytest.raises(ValueError, match="multiple"):
        kv = torch.randn(1, 8, 3, 4, dtype=torch.float64)
        gather_sdpa_dilated_attention(q, kv, kv, [4], [1])


def test_bench_quick_smoke(tmp_path):
    """``bench_cpu.py --quick`` on its smallest case writes a table, JSON and a plot."""
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "bench_cpu.py"),
            "--quick",
            "--case",
            "target1",
            "--modes",
            "fwdbwd",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| gather_sdpa |" in proc.stdout
    assert (tmp_path / "cpu_quick_target1.json").exists()
    import json

    result = json.loads((tmp_path / "cpu_quick_target1.json").read_text())
    timed = [r for r in result["records"] if "time_s" in r]
    assert timed and all(r["time_s"] > 0 and math.isfinite(r["gflops"]) for r in timed)
