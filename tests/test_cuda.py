"""The dilated-attention operator on CUDA, per engine, against the float64 reference.

Every test skips when no GPU is visible or the extension was built without CUDA; a
test of an engine that cannot run on this GPU (architecture) skips with the reason.
Engines: ``cuda_flash``, ``cuda_cudnn``, ``cuda_efficient`` (the composition of dense
problems on ATen's CUDA kernels), ``math`` (the composition on plain matmul/softmax)
and ``fused`` (the project's CUDA kernels, opt-in: forced, in a build with
``LONGNET_FUSED_CUDA=1``; its tests skip with the reason in other builds). Each test
forces its engine and asserts ``longnet.last_engine()`` after the forward and after
the backward.

Forward outputs (out, lse) and the gradients of a loss on both are compared with
``longnet.reference.dilated_attention_reference`` evaluated in float64 on the CPU
from the same rounded inputs. Tolerances of the low-precision formats (relative
Frobenius errors, see LOW_PRECISION_TOL):

* out: the output is rounded once to the format (unit roundoff u = 2^-8 for
  bfloat16, 2^-11 for float16) and the dense kernels round the probabilities to the
  format before the P @ V product, so the error is about 1 u: 4e-3 (bf16), 1e-3
  (fp16), the ratio between the two formats kept.
* lse: computed in float32 from inputs that are exact in both computations, so only
  float32 accumulation errs (about 1e-6 relative for these sizes): 1e-5.
* gradients: stored in the format and formed from dS = P (dP - Delta), which the
  kernels round to the format before two more products: 4 u, i.e. 1.6e-2 (bf16),
  4e-3 (fp16).
* the fused kernels keep the tolerance they were measured against (3e-2).
"""

import math

import pytest
import torch
from test_op import opcheck_backward

import longnet
import longnet.testing
from longnet.reference import dilated_attention_reference, pattern_counts

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and longnet.HAS_CUDA),
    reason="needs a CUDA device and a CUDA build of longnet",
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
        q, k, v = qkv[:, nk - nq :, :h], qkv[:, :, h : h + hk], qkv[:, :, h + hk :]
        return [t.detach().requires_grad_() for t in (q, k, v)]
    return [
        torch.randn(shape, generator=gen, dtype=dtype).requires_grad_()
        for shape in ((b, nq, h, d), (b, nk, hk, d), (b, nk, hk, d))
    ]


def to_device(tensors, dtype, packed=False):
    """Leaf copies on CUDA in `dtype`; with `packed`, non-contiguous like the input."""
    if not packed:
        return [t.detach().to("cuda", dtype).requires_grad_() for t in tensors]
    q, k, v = tensors
    b, nq, h, d = q.shape
    nk, hk = k.shape[1], k.shape[2]
    qkv = torch.empty(b, nk, h + 2 * hk, d, device="cuda", dtype=dtype)
    qkv[:, nk - nq :, :h] = q.detach().to(dtype)
    qkv[:, :, h : h + hk] = k.detach().to(dtype)
    qkv[:, :, h + hk :] = v.detach().to(dtype)
    views = [qkv[:, nk - nq :, :h], qkv[:, :, h : h + hk], qkv[:, :, h + hk :]]
    assert not views[0].is_contiguous() and not views[1].is_contiguous()
    return [t.detach().requires_grad_() for t in views]


def loss_weights(out_shape, lse_shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(out_shape, generator=gen, dtype=torch.float64),
        torch.randn(lse_shape, generator=gen, dtype=torch.float64),
    )


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
    return longnet.dilated_attention(
        q, k, v, ws, rs, is_causal=causal, scale=scale, return_lse=True
    )


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
        torch.testing.assert_close(
            g.cpu().double(), rg.double(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}"
        )


def compare_low_precision(got, want, tol):
    """tol: one number, or (out, lse, gradients) tolerances."""
    tol_out, tol_lse, tol_grad = tol if isinstance(tol, tuple) else (tol, tol, tol)
    out, lse, grads = got
    ref_out, ref_lse, ref_grads = want
    check_finite(out, lse, grads)
    assert torch.equal(torch.isinf(lse).cpu(), torch.isinf(ref_lse)), "rows without keys differ"
    finite = torch.isfinite(ref_lse)
    assert rel_err(out, ref_out) < tol_out, f"out: relative error {rel_err(out, ref_out)}"
    err_lse = rel_err(lse.cpu()[finite], ref_lse[finite])
    assert err_lse < tol_lse, f"lse: relative error {err_lse}"
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert rel_err(g, rg) < tol_grad, f"d{name}: relative error {rel_err(g, rg)}"


# ---------------------------------------------------------------- engines ----

ENGINES = ["cuda_flash", "cuda_cudnn", "cuda_efficient", "math", "fused"]
ENGINE_DTYPES = {
    "cuda_flash": [torch.bfloat16, torch.float16],
    "cuda_cudnn": [torch.bfloat16, torch.float16],
    "cuda_efficient": [torch.float32, torch.bfloat16, torch.float16],
    "math": [torch.float64, torch.float32, torch.bfloat16, torch.float16],
    "fused": [torch.float64, torch.float32, torch.bfloat16, torch.float16],
}
DTYPE_IDS = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}
# (out, lse, gradients), derived in the module docstring.
LOW_PRECISION_TOL = {torch.bfloat16: (4e-3, 1e-5, 1.6e-2), torch.float16: (1e-3, 1e-5, 4e-3)}
FUSED_LOW_PRECISION_TOL = 3e-2


def head_dim_fits(engine, dtype, d):
    if engine in ("cuda_flash", "cuda_cudnn"):
        return d % 8 == 0 and d <= (128 if engine == "cuda_cudnn" else 256)
    if engine == "cuda_efficient":
        return d % (4 if dtype == torch.float32 else 8) == 0 and d <= 256
    return True


def engine_params(cases):
    """(engine, case name, dtype) triples each engine can run (dtype, head dim)."""
    return [
        pytest.param(e, n, dt, id=f"{e}-{n}-{DTYPE_IDS[dt]}")
        for e in ENGINES
        for n in cases
        for dt in ENGINE_DTYPES[e]
        if head_dim_fits(e, dt, CASES[n][5])
    ]


def require_engine(engine, dtype, d=64):
    """Skips when `engine` cannot run on this GPU (its reason, e.g. the architecture)."""
    q = torch.zeros(1, 8, 1, d, device="cuda", dtype=dtype)
    with longnet.use_engine(engine):
        try:
            longnet.dilated_attention(q, q, q, [8], [1])
        except RuntimeError as exc:
            if "cannot run this call" in str(exc):
                pytest.skip(str(exc))
            raise


def run_case(case, causal, dtype, engine, packed=False, scale=None, **kw):
    """(got, want) of the operator on `engine` and of the float64 reference."""
    b, nq, nk, h, hk, d, ws, rs = case
    require_engine(engine, dtype, d)
    q64, k64, v64 = make_inputs(b, nq, nk, h, hk, d, packed=packed)
    # Both sides see the same (rounded) values.
    rounded = [t.detach().to(dtype).double().requires_grad_() for t in (q64, k64, v64)]
    cpu_kw = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    want = evaluate(
        lambda *a: dilated_attention_reference(*a[:5], is_causal=a[5], scale=a[6], **cpu_kw),
        *rounded,
        ws,
        rs,
        causal,
        scale,
    )
    dev_kw = {n: (t.cuda() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    with longnet.use_engine(engine):
        inputs = to_device(rounded, dtype, packed)
        out, lse = longnet.dilated_attention(
            *inputs, ws, rs, is_causal=causal, scale=scale, return_lse=True, **dev_kw
        )
        assert longnet.last_engine() == engine
        weights = loss_weights(out.shape, lse.shape)
        grads = torch.autograd.grad(loss_on_both(out, lse, weights), inputs)
        assert longnet.last_engine() == engine
    got = (out.detach(), lse.detach(), grads)
    assert got[0].dtype == dtype
    assert got[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    return got, want


def compare(got, want, dtype, engine):
    if dtype == torch.float64:
        compare_exact(got, want, atol=1e-9, rtol=1e-7)
    elif dtype == torch.float32:
        compare_exact(got, want, atol=2e-4, rtol=2e-4)
    elif engine == "fused":
        compare_low_precision(got, want, tol=FUSED_LOW_PRECISION_TOL)
    else:
        compare_low_precision(got, want, tol=LOW_PRECISION_TOL[dtype])


# ------------------------------------------------------------ correctness ----


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("engine,name,dtype", engine_params(list(CASES)))
def test_matches_reference(engine, name, dtype, causal):
    got, want = run_case(CASES[name], causal, dtype, engine)
    compare(got, want, dtype, engine)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("engine,name,dtype", engine_params(["batch_gqa", "nq_lt_nk", "d64"]))
def test_non_contiguous_inputs(engine, name, dtype, causal):
    got, want = run_case(CASES[name], causal, dtype, engine, packed=True)
    compare(got, want, dtype, engine)


def odd_views(tensors, dtype):
    """Leaf CUDA views at odd storage offsets with odd strides (buffers one element
    wider, starting one element in): pointers and strides that are not 16-byte
    multiples, where the ATen kernels' 16-byte loads would fault."""
    views = []
    for t in tensors:
        buf = torch.zeros(*t.shape[:-1], t.shape[-1] + 1, device="cuda", dtype=dtype)
        buf[..., 1:] = t.detach().to(dtype)
        views.append(buf[..., 1:].detach().requires_grad_())
    assert views[0].data_ptr() % 16 != 0 and views[0].stride(2) % 8 != 0
    return views


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("engine", ENGINES)
def test_odd_offsets_and_strides(engine, dtype):
    # The engines copy such inputs to aligned storage (docs/operator.md, "Engines"):
    # the reference's results, no misaligned-address fault.
    b, nq, nk, h, hk, d, ws, rs = CASES["batch_gqa"]
    require_engine(engine, dtype, d)
    rounded = [
        t.detach().to(dtype).double().requires_grad_() for t in make_inputs(b, nq, nk, h, hk, d)
    ]
    want = evaluate(reference, *rounded, ws, rs, True)
    with longnet.use_engine(engine):
        got = evaluate(op, *odd_views(rounded, dtype), ws, rs, True)
        assert longnet.last_engine() == engine
    compare(got, want, dtype, engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_strided_grad_out(engine):
    # grad_out with strides unlike out's (cuDNN < 9.5.1 needs them equal; the engine
    # gives cuDNN compact copies of both), in a case whose dense problems see out as a
    # strided view (the efficient backward reads out with row stride H * D; the engine
    # gives it a compact out).
    dtype = torch.bfloat16 if torch.bfloat16 in ENGINE_DTYPES[engine] else ENGINE_DTYPES[engine][0]
    b, nq, nk, h, hk, d, ws, rs = CASES["batch_gqa"]
    require_engine(engine, dtype, d)
    rounded = [
        t.detach().to(dtype).double().requires_grad_() for t in make_inputs(b, nq, nk, h, hk, d)
    ]
    w = (
        torch.randn(
            rounded[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
        )
        .to(dtype)
        .double()
    )
    w = w.transpose(1, 2).contiguous().transpose(1, 2)  # stored (B, H, N, D)
    ref_out, _ = reference(*rounded, ws, rs, True, None)
    want = torch.autograd.grad((ref_out * w).sum(), rounded)
    inputs = to_device(rounded, dtype)
    with longnet.use_engine(engine):
        out, _ = op(*inputs, ws, rs, True, None)
        layouts = []
        out.register_hook(lambda g: layouts.append(g.is_contiguous()))
        got = torch.autograd.grad((out.double() * w.cuda()).sum(), inputs)
        assert longnet.last_engine() == engine
    assert layouts == [False]
    tol = 3e-2 if engine == "fused" else LOW_PRECISION_TOL.get(dtype, (0, 0, 2e-4))[2]
    for name, g, rg in zip("qkv", got, want):
        assert rel_err(g, rg) < tol, f"d{name}: relative error {rel_err(g, rg)}"


RANGE_CASES = {
    # name: (case, position_offset, key_start, key_end)
    "offset_mid_segment": ((2, 30, 30, 4, 2, 16, [8, 16], [1, 2]), 5, None, None),
    "ranges_offset": ((3, 12, 30, 6, 3, 16, [7, 14], [1, 3]), 9, [2, 0, 5], [30, 21, 29]),
    "ranges_empty_row": ((2, 6, 12, 2, 1, 16, [4, 8], [1, 2]), 0, [5, 0], [5, 12]),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", list(RANGE_CASES))
@pytest.mark.parametrize("engine,dtype", [(e, ENGINE_DTYPES[e][0]) for e in ENGINES])
def test_position_offset_and_key_ranges(engine, dtype, name, causal):
    case, offset, start, end = RANGE_CASES[name]
    kw = dict(position_offset=offset)
    if start is not None:
        kw.update(key_start=torch.tensor(start), key_end=torch.tensor(end))
    got, want = run_case(case, causal, dtype, engine, **kw)
    compare(got, want, dtype, engine)


# Packed documents (docs/operator.md, "Packed documents"): document lengths of queries
# and keys; one row of all documents, each attended as if alone.
PACKED_CASES = {
    "docs_self": ([5, 0, 40, 17, 1, 33], [5, 0, 40, 17, 1, 33]),
    "docs_nq_lt_nk": ([3, 0, 12, 0, 9], [8, 0, 40, 6, 9]),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", list(PACKED_CASES))
@pytest.mark.parametrize("engine,dtype", [(e, dt) for e in ENGINES for dt in ENGINE_DTYPES[e][:2]])
def test_packed_documents(engine, dtype, name, causal):
    len_q, len_k = PACKED_CASES[name]
    cu_q = torch.tensor([0, *torch.tensor(len_q).cumsum(0).tolist()])
    cu_k = torch.tensor([0, *torch.tensor(len_k).cumsum(0).tolist()])
    case = (1, int(cu_q[-1]), int(cu_k[-1]), 6, 2, 32, [8, 16, 32], [1, 2, 4])
    got, want = run_case(case, causal, dtype, engine, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    compare(got, want, dtype, engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_custom_scale(engine):
    dtype = ENGINE_DTYPES[engine][0]
    got, want = run_case(CASES["batch_gqa"], True, dtype, engine, scale=0.37)
    compare(got, want, dtype, engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_rows_without_keys(engine):
    b, nq, nk, h, hk, d, ws, rs = CASES["no_r1_pattern"]
    empty_rows = pattern_counts(nq, nk, h, ws, rs, is_causal=False).sum(-1) == 0
    assert empty_rows.any(), "the case must contain rows with no key"
    for dtype in ENGINE_DTYPES[engine]:
        (out, lse, grads), want = run_case(CASES["no_r1_pattern"], False, dtype, engine)
        assert torch.isneginf(lse.cpu()[:, empty_rows]).all()
        assert (out.cpu().permute(0, 2, 1, 3)[:, empty_rows] == 0).all()
        check_finite(out, lse, grads)


@pytest.mark.parametrize("engine", ["cuda_flash", "cuda_efficient", "math"])
def test_batch_beyond_grid_limit(engine):
    # 70000 one-position segments: more problems than one launch's grid holds (65535),
    # so the composition splits the batch.
    dtype = torch.bfloat16
    require_engine(engine, dtype, 8)
    gen = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(1, 70000, 1, 8, generator=gen).to("cuda", dtype) for _ in range(3)]
    with longnet.use_engine(engine):
        out, lse = longnet.dilated_attention(q, k, v, [1], [1], return_lse=True)
    assert longnet.last_engine() == engine
    # One key per query: out = v, lse = scale * <q, k>.
    torch.testing.assert_close(out, v)
    scale = 1 / math.sqrt(8)
    torch.testing.assert_close(
        lse[0, 0], (q.float() * k.float()).sum(-1)[0, :, 0] * scale, atol=1e-4, rtol=1e-4
    )


# --------------------------------------------------------------- choice ----


def test_auto_choice():
    cases = {
        torch.bfloat16: ("cuda_flash", "cuda_cudnn", "cuda_efficient", "math"),
        torch.float32: ("cuda_efficient", "math"),
        torch.float64: ("math",),
    }
    for dtype, allowed in cases.items():
        q = torch.randn(1, 32, 2, 64, device="cuda", dtype=dtype)
        longnet.dilated_attention(q, q, q, [8, 32], [1, 2])
        assert longnet.last_engine() in allowed, (dtype, longnet.last_engine())
    major = torch.cuda.get_device_capability()[0]
    if major >= 8:
        q = torch.randn(1, 32, 2, 64, device="cuda", dtype=torch.bfloat16)
        longnet.dilated_attention(q, q, q, [8], [1])
        assert longnet.last_engine() in ("cuda_flash", "cuda_cudnn")


@pytest.mark.parametrize(
    "engine,dtype,d,reason",
    [
        ("cuda_flash", torch.float32, 64, "takes bfloat16 or float16"),
        ("cuda_flash", torch.bfloat16, 40, "multiple of 8"),
        ("cuda_cudnn", torch.float16, 256, "at most 128"),
        ("cuda_efficient", torch.float64, 64, "takes float32, bfloat16 or float16"),
        ("cpu_flash", torch.float32, 64, "needs CPU tensors"),
    ],
)
def test_forced_engine_that_cannot_run_says_why(engine, dtype, d, reason):
    q = torch.randn(1, 16, 2, d, device="cuda", dtype=dtype)
    with longnet.use_engine(engine):
        with pytest.raises(
            RuntimeError, match=f"engine '{engine}'.*cannot run this call: .*{reason}"
        ):
            longnet.dilated_attention(q, q, q, [8], [1])


# ------------------------------------------------- fused kernels (opt-in) ----


@pytest.mark.skipif(longnet.testing.FUSED_CUDA, reason="the fused CUDA kernels are built in")
def test_fused_without_its_cuda_kernels_says_how_to_build_them():
    q = torch.randn(1, 16, 2, 16, device="cuda")
    with longnet.use_engine("fused"):
        with pytest.raises(
            RuntimeError, match="engine 'fused'.*cannot run this call: .*LONGNET_FUSED_CUDA=1"
        ):
            longnet.dilated_attention(q, q, q, [8], [1])


@pytest.fixture(params=["tensor_core", "generic"])
def kernel_path(request, monkeypatch):
    """Runs a low-precision test of the fused engine on each kernel family."""
    if request.param == "generic":
        monkeypatch.setenv("LONGNET_CUDA_GENERIC", "1")
    else:
        monkeypatch.delenv("LONGNET_CUDA_GENERIC", raising=False)
    return request.param


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", TC_CASES + ["d40", "no_r1_pattern"])
def test_fused_kernel_paths(name, dtype, causal, kernel_path):
    got, want = run_case(CASES[name], causal, dtype, "fused")
    compare_low_precision(got, want, tol=FUSED_LOW_PRECISION_TOL)


def test_fused_long_sequence_bf16_paths_agree(monkeypatch):
    # Many segments and tiles per launch; both kernel families against each other
    # and against the float64 reference.
    case = (1, 2048, 2048, 4, 2, 128, [128, 512, 2048], [1, 2, 8])
    results = {}
    for path in ("tensor_core", "generic"):
        if path == "generic":
            monkeypatch.setenv("LONGNET_CUDA_GENERIC", "1")
        results[path], want = run_case(case, True, torch.bfloat16, "fused")
        compare_low_precision(results[path], want, tol=FUSED_LOW_PRECISION_TOL)
    assert rel_err(results["tensor_core"][0], results["generic"][0]) < 3e-2


def test_fused_unaligned_rows_take_generic_path():
    # Rows that are not 16-byte aligned cannot take the tensor-core loads: the
    # operator must still be right (generic kernels).
    b, nq, nk, h, hk, d, ws, rs = CASES["d64"]
    require_engine("fused", torch.bfloat16, d)
    rounded = [
        t.detach().to(torch.bfloat16).double().requires_grad_()
        for t in make_inputs(b, nq, nk, h, hk, d)
    ]
    want = evaluate(reference, *rounded, ws, rs, True)
    views = []
    for t in rounded:
        buf = torch.zeros(*t.shape[:-1], d + 1, device="cuda", dtype=torch.bfloat16)
        buf[..., 1:] = t.detach().to(torch.bfloat16)
        views.append(buf[..., 1:].detach().requires_grad_())
    assert views[0].stride(2) % 8 != 0
    with longnet.use_engine("fused"):
        got = evaluate(op, *views, ws, rs, True)
    compare_low_precision(got, want, tol=FUSED_LOW_PRECISION_TOL)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "fp16"]
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_auto_matches_cpu_operator(dtype, causal):
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


# ------------------------------------------------------------------ misc ----


@pytest.mark.parametrize("engine", ENGINES)
def test_runs_on_current_stream(engine):
    dtype = ENGINE_DTYPES[engine][0]
    b, nq, nk, h, hk, d, ws, rs = CASES["long_blocks"]
    require_engine(engine, dtype, d)
    q, k, v = to_device(make_inputs(b, nq, nk, h, hk, d), dtype)
    with longnet.use_engine(engine):
        expected = longnet.dilated_attention(q, k, v, ws, rs, is_causal=True)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            got = longnet.dilated_attention(q, k, v, ws, rs, is_causal=True)
        torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_opcheck(engine):
    dtype = ENGINE_DTYPES[engine][0]
    b, nq, nk, h, hk, d, ws, rs = CASES["batch_gqa"]
    require_engine(engine, dtype, d)
    q, k, v = to_device(make_inputs(b, nq, nk, h, hk, d), dtype)
    with longnet.use_engine(engine):
        for causal in (False, True):
            torch.library.opcheck(
                torch.ops.longnet.dilated_attention_fwd.default,
                (q, k, v, ws, rs, causal, 1.0 / math.sqrt(d)),
            )
        opcheck_backward(q, k, v, ws, rs)


@pytest.mark.parametrize("engine", ["math", "fused"])
def test_empty_sequence(engine):
    require_engine(engine, torch.float32, 8)
    q = torch.randn(2, 0, 4, 8, device="cuda", requires_grad=True)
    k = torch.randn(2, 0, 4, 8, device="cuda", requires_grad=True)
    with longnet.use_engine(engine):
        out, lse = longnet.dilated_attention(q, k, k, [4], [1], return_lse=True)
    assert out.shape == (2, 0, 4, 8) and lse.shape == (2, 4, 0) and out.is_cuda


def test_mixed_devices_raise_clear_error():
    q = torch.randn(1, 8, 2, 16, device="cuda")
    k = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="one device"):
        longnet.dilated_attention(q, k, k, [4], [1])


def test_packed_lm_never_waits_for_the_offsets():
    """A packed LongNetLM forward + backward on CUDA with the offsets given as a
    PackedDocuments makes no synchronising call (torch.cuda.set_sync_debug_mode
    "error" raises at any: a copy of the offsets back to the host, an .item(), a
    nonzero), and equals the same step given the offsets as a CUDA tensor (read once
    by the LM)."""
    from longnet.model import LongNetConfig, LongNetLM
    from longnet.packing import PackedDocuments

    torch.manual_seed(0)
    config = LongNetConfig(
        vocab_size=50, embed_dim=32, num_heads=4, num_layers=2, ffn_dim=64,
        segment_lengths=[4, 8], dilation_rates=[1, 2],
    )  # fmt: skip
    model = LongNetLM(config).cuda().double()
    ids = torch.randint(0, 50, (1, 30), device="cuda")
    lengths = [7, 0, 12, 11]
    docs = PackedDocuments.from_lengths(lengths, device="cuda")
    _, want = model(ids, ids, cu_seqlens=docs.cu_seqlens)
    want.backward()
    grad_want = model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, loss = model(ids, ids, cu_seqlens=docs)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    torch.testing.assert_close(model.embed_tokens.weight.grad, grad_want, rtol=0, atol=0)
