"""The CUDA kernels of the dilated-attention operator against the float64 reference.

Every test skips when no GPU is visible or the extension was built without CUDA.
Forward outputs (out, lse) and the gradients of a loss on both are compared with
``longnet.reference.dilated_attention_reference`` evaluated in float64 on the CPU,
and with the CPU operator on the same inputs. bfloat16/float16 run twice: on the
tensor-core kernels and, with ``LONGNET_CUDA_GENERIC=1``, on the generic kernels.
"""

import math

import pytest
import torch

import longnet
from longnet.reference import dilated_attention_reference, pattern_counts

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and longnet.HAS_CUDA),
    reason="needs a CUDA device and longnet built with its CUDA kernels",
)

CASES = {
    # name: (B, Nq, Nk, H, Hk, D, segment_lengths, dilation_rates)
    "n_multiple_of_w": (1, 64, 64, 2, 2, 16, [8, 16, 32], [1, 2, 4]),
    "n_not_multiple": (1, 37, 37, 2, 2, 16, [8, 16, 32], [1, 2, 4]),
    "w_larger_than_n": (1, 40, 40, 2, 2, 32, [16, 128], [1, 4]),
    "r_not_dividing_w": (1, 45, 45, 3, 3, 16, [10, 21], [3, 4]),
    "r_larger_than_h": (1, 48, 48, 2, 2, 16, [12, 24], [1, 8]),
    "no_r1_pattern": (1, 33, 33, 4, 4, 16, [8, 16], [2, 4]),
    "batch_gqa": (3, 29, 29, 6, 2, 32, [8, 16], [1, 2]),
    "mqa": (2, 30, 30, 4, 1, 16, [6, 12], [1, 3]),
    "nq_lt_nk": (2, 11, 50, 4, 2, 16, [8, 32], [1, 2]),
    "decode_one": (1, 1, 71, 4, 4, 64, [16, 64], [1, 4]),
    "d64": (1, 40, 40, 2, 2, 64, [8, 16], [1, 2]),
    "d128": (1, 24, 24, 2, 1, 128, [8, 24], [1, 2]),
    "d40": (1, 35, 35, 2, 2, 40, [7, 14], [1, 2]),
    "d3": (1, 20, 20, 2, 2, 3, [5, 10], [1, 2]),
    "d300_chunks": (1, 20, 20, 2, 1, 300, [5, 20], [1, 2]),  # head dim > 256: chunk loop
    "repeat_pattern": (1, 32, 32, 2, 2, 16, [8, 8], [1, 1]),
    # Sparse segments longer than the kernels' tiles (16 and 64 rows, 32 and 64 keys).
    "long_blocks": (1, 260, 300, 2, 1, 32, [150, 300], [1, 2]),
}

# Cases whose head dim the tensor-core kernels take (32, 64, 96, 128).
TC_CASES = ["w_larger_than_n", "batch_gqa", "decode_one", "d64", "d128", "long_blocks"]
LOW_PRECISION = [torch.bfloat16, torch.float16]


def make_inputs(b, nq, nk, h, hk, d, dtype=torch.float64, seed=0, packed=False):
    """CPU float64 leaf tensors (q, k, v); `packed` gives non-contiguous views."""
    gen = torch.Generator().manual_seed(seed)
    if packed:
        qkv = torch.randn(b, nk, h + 2 * hk, d, generator=gen, dtype=dtype)
        q, k, v = qkv[:, nk - nq:, :h], qkv[:, :, h:h + hk], qkv[:, :, h + hk:]
        return [t.detach().requires_grad_() for t in (q, k, v)]
    return [torch.randn(shape, generator=gen, dtype=dtype).requires_grad_()
            for shape in ((b, nq, h, d), (b, nk, hk, d), (b, nk, hk, d))]


def to_device(tensors, dtype, packed=False):
    """Leaf copies on CUDA in `dtype`; with `packed`, non-contiguous like the input."""
    if not packed:
        return [t.detach().to("cuda", dtype).requires_grad_() for t in tensors]
    q, k, v = tensors
    b, nq, h, d = q.shape
    nk, hk = k.shape[1], k.shape[2]
    qkv = torch.empty(b, nk, h + 2 * hk, d, device="cuda", dtype=dtype)
    qkv[:, nk - nq:, :h] = q.detach().to(dtype)
    qkv[:, :, h:h + hk] = k.detach().to(dtype)
    qkv[:, :, h + hk:] = v.detach().to(dtype)
    views = [qkv[:, nk - nq:, :h], qkv[:, :, h:h + hk], qkv[:, :, h + hk:]]
    assert not views[0].is_contiguous() and not views[1].is_contiguous()
    return [t.detach().requires_grad_() for t in views]


def loss_weights(out_shape, lse_shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(out_shape, generator=gen, dtype=torch.float64),
            torch.randn(lse_shape, generator=gen, dtype=torch.float64))


def loss_on_both(out, lse, weights):
    """A loss on out and on the finite entries of lse (weights fixed per case)."""
    w_out, w_lse = (w.to(out.device) for w in weights)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (out.double() * w_out).sum() + (lse.double() * w_lse).sum()


def evaluate(fn, q, k, v, ws, rs, causal, scale=None):
    """(out, lse, (dq, dk, dv)) of fn on leaf tensors, gradients of loss_on_both."""
    out, lse = fn(q, k, v, ws, rs, causal, scale)
    weights = loss_weights(out.shape, lse.shape)
    grads = torch.autograd.grad(loss_on_both(out, lse, weights), (q, k, v))
    return out.detach(), lse.detach(), grads


def op(q, k, v, ws, rs, causal, scale):
    return longnet.dilated_attention(q, k, v, ws, rs, is_causal=causal, scale=scale,
                                     return_lse=True)


def reference(q, k, v, ws, rs, causal, scale):
    return dilated_attention_reference(q, k, v, ws, rs, is_causal=causal, scale=scale)


def check_finite(out, lse, grads):
    assert not torch.isnan(out).any(), "out has NaN"
    assert not torch.isnan(lse).any(), "lse has NaN"
    assert not torch.isposinf(lse).any(), "lse has +inf"
    for name, g in zip("qkv", grads):
        assert torch.isfinite(g).all(), f"d{name} has non-finite entries"


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare_exact(got, want, atol, rtol):
    out, lse, grads = got
    ref_out, ref_lse, ref_grads = want
    check_finite(out, lse, grads)
    assert out.is_cuda and lse.is_cuda
    out, lse = out.cpu().double(), lse.cpu().double()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without keys differ"
    torch.testing.assert_close(out, ref_out.double(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse.double(), atol=atol, rtol=rtol)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.is_cuda and g.shape == rg.shape
        torch.testing.assert_close(g.cpu().double(), rg.double(), atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"d{n}: {m}")


def compare_low_precision(got, want, tol):
    out, lse, grads = got
    ref_out, ref_lse, ref_grads = want
    check_finite(out, lse, grads)
    assert torch.equal(torch.isinf(lse).cpu(), torch.isinf(ref_lse)), "rows without keys differ"
    finite = torch.isfinite(ref_lse)
    assert rel_err(out, ref_out) < tol, rel_err(out, ref_out)
    assert rel_err(lse.cpu()[finite], ref_lse[finite]) < tol
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert rel_err(g, rg) < tol, f"d{name}: relative error {rel_err(g, rg)}"


def run_case(case, causal, dtype, packed=False, scale=None):
    b, nq, nk, h, hk, d, ws, rs = case
    q64, k64, v64 = make_inputs(b, nq, nk, h, hk, d, packed=packed)
    # Both sides see the same (rounded) values.
    rounded = [t.detach().to(dtype).double().requires_grad_() for t in (q64, k64, v64)]
    want = evaluate(reference, *rounded, ws, rs, causal, scale)
    got = evaluate(op, *to_device(rounded, dtype, packed), ws, rs, causal, scale)
    assert got[0].dtype == dtype
    assert got[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    return got, want


@pytest.fixture(params=["tensor_core", "generic"])
def kernel_path(request, monkeypatch):
    """Runs a low-precision test on each kernel family."""
    if request.param == "generic":
        monkeypatch.setenv("LONGNET_CUDA_GENERIC", "1")
    else:
        monkeypatch.delenv("LONGNET_CUDA_GENERIC", raising=False)
    return request.param


# ------------------------------------------------------------ correctness ----

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", list(CASES))
def test_float64_matches_reference(name, causal):
    got, want = run_case(CASES[name], causal, torch.float64)
    compare_exact(got, want, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", list(CASES))
def test_float32_matches_reference(name, causal):
    got, want = run_case(CASES[name], causal, torch.float32)
    compare_exact(got, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", TC_CASES + ["d40", "no_r1_pattern"])
def test_low_precision_matches_reference(name, dtype, causal, kernel_path):
    got, want = run_case(CASES[name], causal, dtype)
    compare_low_precision(got, want, tol=3e-2)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
@pytest.mark.parametrize("name", ["batch_gqa", "nq_lt_nk", "d64"])
def test_non_contiguous_inputs(name, dtype, causal, kernel_path):
    got, want = run_case(CASES[name], causal, dtype, packed=True)
    if dtype == torch.float64:
        compare_exact(got, want, atol=1e-9, rtol=1e-7)
    else:
        compare_low_precision(got, want, tol=3e-2)


def test_custom_scale():
    got, want = run_case(CASES["batch_gqa"], True, torch.float64, scale=0.37)
    compare_exact(got, want, atol=1e-9, rtol=1e-7)


def test_rows_without_keys():
    b, nq, nk, h, hk, d, ws, rs = CASES["no_r1_pattern"]
    empty_rows = pattern_counts(nq, nk, h, ws, rs, is_causal=False).sum(-1) == 0
    assert empty_rows.any(), "the case must contain rows with no key"
    for dtype in (torch.float64, torch.bfloat16):
        (out, lse, grads), want = run_case(CASES["no_r1_pattern"], False, dtype)
        assert torch.isneginf(lse.cpu()[:, empty_rows]).all()
        assert (out.cpu().permute(0, 2, 1, 3)[:, empty_rows] == 0).all()
        check_finite(out, lse, grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cuda_matches_cpu_operator(dtype, causal):
    b, nq, nk, h, hk, d, ws, rs = 2, 150, 300, 4, 2, 64, [64, 128, 300], [1, 2, 4]
    q64, k64, v64 = make_inputs(b, nq, nk, h, hk, d)
    cpu = [t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64)]
    got_cpu = evaluate(op, *cpu, ws, rs, causal)
    got_cuda = evaluate(op, *to_device(cpu, dtype), ws, rs, causal)
    check_finite(*got_cuda)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert rel_err(got_cuda[0], got_cpu[0]) < tol
    finite = torch.isfinite(got_cpu[1])
    assert rel_err(got_cuda[1].cpu()[finite], got_cpu[1][finite]) < tol
    for g, gc in zip(got_cuda[2], got_cpu[2]):
        assert g.dtype == dtype
        assert rel_err(g, gc) < tol


def test_long_sequence_bf16_paths_agree(monkeypatch):
    # Many segments and tiles per launch; both kernel families against each other
    # and against the float64 reference.
    b, n, h, hk, d, ws, rs = 1, 2048, 4, 2, 128, [128, 512, 2048], [1, 2, 8]
    q64, k64, v64 = make_inputs(b, n, n, h, hk, d)
    rounded = [t.detach().to(torch.bfloat16).double().requires_grad_() for t in (q64, k64, v64)]
    want = evaluate(reference, *rounded, ws, rs, True)
    results = {}
    for path in ("tensor_core", "generic"):
        if path == "generic":
            monkeypatch.setenv("LONGNET_CUDA_GENERIC", "1")
        results[path] = evaluate(op, *to_device(rounded, torch.bfloat16), ws, rs, True)
        compare_low_precision(results[path], want, tol=3e-2)
    assert rel_err(results["tensor_core"][0], results["generic"][0]) < 3e-2


def test_unaligned_rows_take_generic_path():
    # Rows that are not 16-byte aligned cannot take the tensor-core loads: the
    # operator must still be right (generic kernels).
    b, nq, nk, h, hk, d, ws, rs = CASES["d64"]
    rounded = [t.detach().to(torch.bfloat16).double().requires_grad_()
               for t in make_inputs(b, nq, nk, h, hk, d)]
    want = evaluate(reference, *rounded, ws, rs, True)
    views = []
    for t in rounded:
        buf = torch.zeros(*t.shape[:-1], d + 1, device="cuda", dtype=torch.bfloat16)
        buf[..., 1:] = t.detach().to(torch.bfloat16)
        views.append(buf[..., 1:].detach().requires_grad_())
    assert views[0].stride(2) % 8 != 0
    got = evaluate(op, *views, ws, rs, True)
    compare_low_precision(got, want, tol=3e-2)


def test_runs_on_current_stream():
    b, nq, nk, h, hk, d, ws, rs = CASES["long_blocks"]
    q, k, v = to_device(make_inputs(b, nq, nk, h, hk, d), torch.float32)
    expected = longnet.dilated_attention(q, k, v, ws, rs, is_causal=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = longnet.dilated_attention(q, k, v, ws, rs, is_causal=True)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_opcheck():
    for name in ["batch_gqa", "nq_lt_nk", "no_r1_pattern"]:
        b, nq, nk, h, hk, d, ws, rs = CASES[name]
        q, k, v = to_device(make_inputs(b, nq, nk, h, hk, d), torch.float32)
        for causal in (False, True):
            torch.library.opcheck(torch.ops.longnet.dilated_attention_fwd.default,
                                  (q, k, v, ws, rs, causal, 1.0 / math.sqrt(d)))
        with torch.no_grad():
            out, lse = torch.ops.longnet.dilated_attention_fwd(q, k, v, ws, rs, True, 0.25)
        torch.library.opcheck(
            torch.ops.longnet.dilated_attention_bwd.default,
            (torch.randn_like(out), torch.zeros_like(lse), q.detach(), k.detach(), v.detach(),
             out, lse, ws, rs, True, 0.25),
        )


def test_empty_sequence():
    q = torch.randn(2, 0, 4, 8, device="cuda", requires_grad=True)
    k = torch.randn(2, 0, 4, 8, device="cuda", requires_grad=True)
    out, lse = longnet.dilated_attention(q, k, k, [4], [1], return_lse=True)
    assert out.shape == (2, 0, 4, 8) and lse.shape == (2, 4, 0) and out.is_cuda


def test_mixed_devices_raise_clear_error():
    q = torch.randn(1, 8, 2, 16, device="cuda")
    k = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="one device"):
        longnet.dilated_attention(q, k, k, [4], [1])
