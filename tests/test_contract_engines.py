"""The CPU contract engines ``contract_cuda_flash``, ``contract_cuda_efficient`` and
``contract_cuda_cudnn`` (docs/operator.md, "Engines"): the composition and the argument
preparation of the CUDA engines (csrc/engine/kernel_contract.cpp), with each CUDA
kernel's input contract enforced and exploited on CPU (csrc/testing/engines_contract.cpp).
They run the correctness matrix of tests/test_engines.py against the float64 reference,
and inputs with odd storage offsets and strides go through every engine.

The contract engines exist in testing builds only (``LONGNET_BUILD_TESTING=1``,
longnet.testing): without one, every test that runs them skips saying so, or fails
under CI=1.

Before the argument preparation kept those contracts, these tests failed (checked by
replacing kernel_contract.cpp's preparation with the former direct calls; the report
of each test says what it caught):

* contract_cuda_efficient: wrong dq/dk in bf16/fp16 wherever out reached the backward
  as a view with row stride r * H * D (dilation > 1, GQA or split head sets): the
  kernel reads out with row stride H * D;
* contract_cuda_flash (and the other two): "misaligned address" errors for inputs at
  odd offsets or with odd strides, where a GPU faults;
* contract_cuda_cudnn: errors for one-query and one-key problems (decoding, r = w,
  partial last segments) and for a grad_out whose strides differ from out's.

Tolerances (relative Frobenius norms against the float64 reference on the same
rounded inputs, with loss weights representable in the format, so the backward gets
exactly the reference's incoming gradients; u = 2^-8 bf16, 2^-11 fp16): the contract
engines compute each dense problem in float32 and round its out, dq, dk, dv once to
the format; the composition merges them in float32 and rounds once more. So out and
dv carry two roundings (2 u), dq and dk also Delta from the rounded out and the
rounded contributions of the lse gradient (4 u); lse is float32 throughout (1e-5, the
float32 accumulation bound of tests/test_op.py); float32 inputs: 1e-5 everywhere.
"""

import pytest
import torch
from test_engines import GQA_CASES, RANGE_CASES
from test_op import CASES, CPU_FLASH_LSE, make_inputs, require_testing_build

import longnet
import longnet.testing
from longnet.reference import dilated_attention_reference

CONTRACT = list(longnet.testing.CONTRACT_ENGINES)
DTYPES = {
    "contract_cuda_flash": [torch.bfloat16, torch.float16],
    "contract_cuda_efficient": [torch.float32, torch.bfloat16, torch.float16],
    "contract_cuda_cudnn": [torch.bfloat16, torch.float16],
}
MAX_DIM = {"contract_cuda_flash": 256, "contract_cuda_efficient": 256, "contract_cuda_cudnn": 128}
IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "fp16"}
F32 = 1e-5
U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.fixture(autouse=True)
def _needs_testing_build(request):
    """Every test here runs a contract engine or its test operators, except those
    parametrised with another engine (test_odd_offsets_and_strides); these need a
    testing build."""
    callspec = getattr(request.node, "callspec", None)
    engine = callspec.params.get("engine") if callspec is not None else None
    if engine is None or engine in CONTRACT:
        require_testing_build()


def tolerances(dtype, engine=None):
    """{"out", "lse", "dq", "dk", "dv"} -> relative-norm bound (module docstring;
    cpu_flash's lse: test_op.CPU_FLASH_LSE)."""
    if dtype == torch.float32:
        return dict.fromkeys(("out", "lse", "dq", "dk", "dv"), F32)
    u = U[dtype]
    lse = CPU_FLASH_LSE if engine == "cpu_flash" else F32
    return {"out": 2 * u + F32, "lse": lse, "dq": 4 * u + F32, "dk": 4 * u + F32, "dv": 2 * u + F32}


def takes(engine, dtype, d):
    return d % (4 if dtype == torch.float32 else 8) == 0 and d <= MAX_DIM[engine]


def params(cases):
    return [
        pytest.param(e, n, dt, id=f"{e}-{n}-{IDS[dt]}")
        for e in CONTRACT
        for n in cases
        for dt in DTYPES[e]
        if takes(e, dt, cases[n][5])
    ]


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def run(engine, case, causal, dtype, layout="contiguous", scale=None, strided_grad=False, **kw):
    """(got, want) dicts of out, lse, dq, dk, dv: `engine` on inputs in `dtype` laid out
    as `layout`, and the float64 reference on the same values and incoming gradients."""
    b, nq, nk, h, hk, d, ws, rs = case
    q64, k64, v64 = make_inputs(b, nq, nk, h, hk, d, packed=layout == "packed")
    vals = [t.detach().to(dtype) for t in (q64, k64, v64)]
    if layout == "odd":
        # Views into buffers one element wider, starting one element in: data pointers
        # 2 (or 4) bytes past 16-byte boundaries, and every stride odd.
        views = []
        for t in vals:
            buf = torch.zeros(*t.shape[:-1], d + 1, dtype=dtype)
            buf[..., 1:] = t
            views.append(buf[..., 1:])
        vals = views
    inputs = [t.detach().requires_grad_() for t in vals]
    refs = [t.detach().double().requires_grad_() for t in vals]
    gen = torch.Generator().manual_seed(1)
    w_out = torch.randn(q64.shape, generator=gen, dtype=torch.float64).to(dtype).double()
    w_lse = torch.randn((b, h, nq), generator=gen, dtype=torch.float64).float().double()
    if strided_grad:  # stored (B, H, N, D): out's incoming gradient arrives with those strides
        w_out = w_out.transpose(1, 2).contiguous().transpose(1, 2)

    def loss(out, lse):
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        return (out.double() * w_out).sum() + (lse.double() * w_lse).sum()

    with longnet.testing.use_engine(engine):
        out, lse = longnet.dilated_attention(
            *inputs, ws, rs, is_causal=causal, scale=scale, return_lse=True, **kw
        )
        assert longnet.last_engine() == engine
        grad_layouts = []
        out.register_hook(lambda g: grad_layouts.append(g.is_contiguous()))
        grads = torch.autograd.grad(loss(out, lse), inputs)
        assert longnet.last_engine() == engine
        assert grad_layouts == [not strided_grad]
    ref_out, ref_lse = dilated_attention_reference(
        *refs, ws, rs, is_causal=causal, scale=scale, **kw
    )
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), refs)
    got = dict(out=out, lse=lse, dq=grads[0], dk=grads[1], dv=grads[2])
    want = dict(out=ref_out, lse=ref_lse, dq=ref_grads[0], dk=ref_grads[1], dv=ref_grads[2])
    return got, want


def check(got, want, dtype, engine=None):
    tol = tolerances(dtype, engine)
    assert got["out"].dtype == dtype and got["lse"].dtype == torch.float32
    assert not torch.isnan(got["out"]).any() and not torch.isnan(got["lse"]).any()
    assert torch.equal(torch.isinf(got["lse"]), torch.isinf(want["lse"])), "rows without keys"
    finite = torch.isfinite(want["lse"])
    errors = {
        "out": rel(got["out"], want["out"]),
        "lse": rel(got["lse"][finite], want["lse"][finite]),
    }
    for name in ("dq", "dk", "dv"):
        assert got[name].dtype == dtype and torch.isfinite(got[name]).all(), name
        errors[name] = rel(got[name], want[name])
    bad = {n: (e, tol[n]) for n, e in errors.items() if not e < tol[n]}
    assert not bad, f"relative errors above their bounds (error, bound): {bad}"


# ------------------------------------------------------------ the matrix ----


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("engine,name,dtype", params(CASES))
def test_matrix(engine, name, dtype, causal):
    """tests/test_engines.py's cases. Caught before the fix: contract_cuda_efficient,
    bf16/fp16, every case with r > 1 or GQA (out read with the wrong row stride);
    contract_cuda_cudnn, decode_one, w_larger_than_n, nq_lt_nk, n_not_multiple and the
    other cases with one-query or one-key problems (raised)."""
    check(*run(engine, CASES[name], causal, dtype), dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("engine,name,dtype", params(GQA_CASES))
def test_gqa_head_sets(engine, name, dtype, causal):
    """Head sets of GQA groups against dilation rates. Caught before the fix:
    contract_cuda_efficient bf16/fp16 (head stride hstep * D, row stride r * H * D of
    out)."""
    check(*run(engine, GQA_CASES[name], causal, dtype), dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("engine,name,dtype", params({n: c[0] for n, c in RANGE_CASES.items()}))
def test_position_offset_and_key_ranges(engine, name, dtype, causal):
    """Offsets and key ranges make partial segments and one-key problems. Caught
    before the fix: contract_cuda_cudnn (one-query/one-key problems),
    contract_cuda_efficient bf16/fp16 (strided out)."""
    case, offset, start, end = RANGE_CASES[name]
    kw = dict(position_offset=offset)
    if start is not None:
        kw.update(key_start=torch.tensor(start), key_end=torch.tensor(end))
    check(*run(engine, case, causal, dtype, **kw), dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "engine,name,dtype", params({n: CASES[n] for n in ["batch_gqa", "nq_lt_nk", "d40", "mqa"]})
)
def test_non_contiguous_inputs(engine, name, dtype, causal):
    """Slices of one packed projection (aligned: strides are multiples of D)."""
    check(*run(engine, CASES[name], causal, dtype, layout="packed"), dtype)


@pytest.mark.parametrize("engine", CONTRACT)
def test_custom_scale(engine):
    check(*run(engine, CASES["batch_gqa"], True, torch.bfloat16, scale=0.37), torch.bfloat16)


@pytest.mark.parametrize("engine", CONTRACT)
def test_strided_grad_out(engine):
    """grad_out with strides unlike out's. Caught before the fix: contract_cuda_cudnn
    (cuDNN < 9.5.1 needs grad_out with out's strides; a cached graph would run with
    other ones)."""
    check(*run(engine, CASES["batch_gqa"], True, torch.bfloat16, strided_grad=True), torch.bfloat16)


@pytest.mark.parametrize("engine", CONTRACT)
def test_low_precision_bounds_catch_a_scale_error(engine):
    """The bounds are tight enough to see a 1% error in the softmax scale."""
    got, want = run(engine, CASES["d64"], True, torch.bfloat16, scale=0.125 * 1.01)
    _, want_right = run(engine, CASES["d64"], True, torch.bfloat16, scale=0.125)
    with pytest.raises(AssertionError, match="above their bounds"):
        check(got, want_right, torch.bfloat16)
    check(got, want, torch.bfloat16)


# ------------------------------------------- odd offsets and strides ----


def cpu_engines():
    return [e for e in longnet.testing.ENGINES if e != "auto"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("engine", cpu_engines())
def test_odd_offsets_and_strides(engine, dtype):
    """Inputs at odd storage offsets with odd strides, through every engine: the
    reference's results, or a clear error from an engine that refuses them (the CUDA
    engines on CPU tensors). Caught before the fix: all three contract engines raised
    "misaligned address" (where a GPU kernel faults and kills the CUDA context)."""
    case = CASES["batch_gqa"]
    if not longnet.testing.engine_built(engine):
        with pytest.raises(RuntimeError, match=f"engine '{engine}'.*not built"):
            run(engine, case, True, dtype, layout="odd")
        return
    if engine.startswith("cuda_"):
        with pytest.raises(RuntimeError, match=f"engine '{engine}'.*needs CUDA tensors"):
            run(engine, case, True, dtype, layout="odd")
        return
    # fused, cpu_flash and math compute in float32 and round at most as often as the
    # contract engines: the same bounds.
    check(*run(engine, case, True, dtype, layout="odd"), dtype, engine)


# -------------------------------------------------------- the contracts ----


@pytest.mark.parametrize(
    "engine,dtype,d,reason",
    [
        ("contract_cuda_flash", torch.float32, 16, "takes bfloat16 or float16 inputs"),
        ("contract_cuda_cudnn", torch.float32, 16, "takes bfloat16 or float16 inputs"),
        ("contract_cuda_efficient", torch.float64, 16, "takes float32, bfloat16 or float16"),
        ("contract_cuda_flash", torch.bfloat16, 12, "multiple of 8 and at most 256"),
        ("contract_cuda_efficient", torch.float32, 6, "multiple of 4 and at most 256"),
        ("contract_cuda_cudnn", torch.float16, 136, "multiple of 8 and at most 128"),
    ],
)
def test_refusals_name_the_kernel_limit(engine, dtype, d, reason):
    q = torch.randn(1, 16, 2, d, dtype=dtype)
    with longnet.testing.use_engine(engine):
        with pytest.raises(
            RuntimeError, match=f"engine '{engine}'.*cannot run this call: .*{reason}"
        ):
            longnet.dilated_attention(q, q, q, [8], [1])


def test_contract_engines_are_listed_for_tests_only_and_never_automatic():
    for engine in CONTRACT:
        assert engine in longnet.testing.ENGINES and longnet.testing.engine_built(engine)
        assert engine not in longnet.engines.ENGINES
    q = torch.randn(1, 32, 2, 16, dtype=torch.bfloat16)
    longnet.dilated_attention(q, q, q, [8, 32], [1, 2])
    assert longnet.last_engine() == "fused"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("engine", CONTRACT)
def test_contract_engines_refuse_cuda_tensors(engine):
    q = torch.randn(1, 16, 2, 16, device="cuda", dtype=torch.bfloat16)
    with longnet.testing.use_engine(engine):
        with pytest.raises(RuntimeError, match="needs CPU tensors"):
            longnet.dilated_attention(q, q, q, [8], [1])


# ------------------------------------------ the kernel calls themselves ----
# torch.ops.longnet._contract_kernel_forward/_backward run one contract engine's
# kernel call on (Bt, L, H, D) tensors exactly as given (no argument preparation):
# what the CUDA kernel would do with these arguments.


def kernel_forward(engine, q, k, v, causal, scale):
    return torch.ops.longnet._contract_kernel_forward(engine, q, k, v, causal, scale)


def kernel_backward(engine, grad_out, q, k, v, out, lse, causal, scale):
    return torch.ops.longnet._contract_kernel_backward(
        engine, grad_out, q, k, v, out, lse, causal, scale
    )


def dense(q, k, v, causal, scale, bottom_right):
    """float64 (out (Bt, Lq, H, D), lse (Bt, H, Lq)) of one dense problem."""
    qh, kh, vh = [t.double().transpose(1, 2) for t in (q, k, v)]
    s = qh @ kh.transpose(-1, -2) * scale
    if causal:
        lq, lk = q.shape[1], k.shape[1]
        shift = lk - lq if bottom_right else 0
        s = s.masked_fill(torch.arange(lk)[None] > torch.arange(lq)[:, None] + shift, -torch.inf)
    lse = s.logsumexp(-1)
    return ((s - lse[..., None]).exp() @ vh).transpose(1, 2), lse


def problem(b, lq, lk, h, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, h, d, generator=gen).to(dtype) for n in (lq, lk, lk)]


@pytest.mark.parametrize(
    "engine,bottom_right",
    [
        ("contract_cuda_flash", True),
        ("contract_cuda_efficient", False),
        ("contract_cuda_cudnn", False),
    ],
)
def test_kernel_causal_alignment_and_lse_layout(engine, bottom_right):
    """Lq < Lk: flash aligns the causal mask bottom-right, the efficient kernel
    (custom_mask_type 1) and cuDNN top-left; lse comes in each kernel's layout."""
    q, k, v = problem(2, 5, 9, 2, 16, torch.bfloat16)
    out, lse = kernel_forward(engine, q, k, v, True, 0.25)
    want_out, want_lse = dense(q, k, v, True, 0.25, bottom_right)
    other_out, _ = dense(q, k, v, True, 0.25, not bottom_right)
    u = U[torch.bfloat16]
    assert rel(out, want_out) < u + F32  # one rounding of the float32 result
    assert rel(out, other_out) > 10 * u  # the two alignments differ
    if engine == "contract_cuda_flash":
        assert lse.shape == (2, 2, 5) and lse.is_contiguous()
    elif engine == "contract_cuda_efficient":
        assert lse.shape == (2, 2, 32)  # rows padded to a multiple of 32, unspecified
        assert torch.isnan(lse[..., 5:]).all()
        lse = lse[..., :5]
    else:
        assert lse.shape == (2, 2, 5, 1)
        lse = lse[..., 0]
    assert rel(lse, want_lse) < F32


@pytest.mark.parametrize("engine", CONTRACT)
def test_kernel_raises_where_a_gpu_reads_misaligned_memory(engine):
    q, k, v = problem(1, 8, 8, 2, 16, torch.bfloat16)
    buf = torch.zeros(1, 8, 2, 17, dtype=torch.bfloat16)
    buf[..., 1:] = q
    with pytest.raises(RuntimeError, match="misaligned address: the kernel reads query"):
        kernel_forward(engine, buf[..., 1:], k, v, False, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_efficient_kernel_reads_out_with_row_stride_h_times_d(dtype):
    """The 16-bit efficient backward computes Delta from out read with row stride
    H * D: out given as a view with another row stride gives wrong dq, dk (float32
    computes Delta from the tensors and is right), which is why the engine gives it a
    compact out."""
    q, k, v = problem(1, 8, 8, 2, 16, dtype)
    engine = "contract_cuda_efficient"
    out, lse = kernel_forward(engine, q, k, v, False, 0.25)
    buf = torch.zeros(1, 8, 4, 16, dtype=dtype)
    buf[:, :, ::2] = out
    strided = buf[:, :, ::2]  # row stride 4 * 16, not H * D = 32
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = dense(*leaves, False, 0.25, False)
    want = torch.autograd.grad((ref_out * g.double()).sum(), leaves)
    tol = F32 if dtype == torch.float32 else 4 * U[dtype] + F32
    compact_grads = kernel_backward(engine, g, q, k, v, out, lse, False, 0.25)
    strided_grads = kernel_backward(engine, g, q, k, v, strided, lse, False, 0.25)
    for got, w in zip(compact_grads, want):
        assert rel(got, w) < tol
    errors = [rel(got, w) for got, w in zip(strided_grads, want)]
    if dtype == torch.float32:
        assert max(errors) < tol
    else:
        assert errors[0] > 10 * tol and errors[1] > 10 * tol  # dq, dk; dv needs no Delta


def test_flash_kernel_reads_lse_contiguous():
    """mha_bwd reads softmax_lse as a contiguous (Bt, H, Lq) tensor whatever its strides,
    which is why the engine gives it lse.contiguous()."""
    q, k, v = problem(1, 8, 8, 2, 16, torch.bfloat16)
    engine = "contract_cuda_flash"
    out, lse = kernel_forward(engine, q, k, v, False, 0.25)
    transposed = lse.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (16, 1, 2)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    right = kernel_backward(engine, g, q, k, v, out, lse, False, 0.25)
    wrong = kernel_backward(engine, g, q, k, v, out, transposed, False, 0.25)
    assert rel(wrong[0], right[0]) > 0.1


def test_cudnn_kernel_refuses_one_query_and_unequal_grad_strides():
    """cuDNN fails for one-query problems (some versions) and, before 9.5.1, for a
    grad_out whose strides differ from out's: the engine runs the former on `math` and
    gives cuDNN compact out and grad_out."""
    engine = "contract_cuda_cudnn"
    q, k, v = problem(1, 1, 8, 2, 16, torch.bfloat16)
    with pytest.raises(RuntimeError, match="one query"):
        kernel_forward(engine, q, k, v, False, 0.25)
    q, k, v = problem(1, 8, 8, 2, 16, torch.bfloat16, seed=1)
    out, lse = kernel_forward(engine, q, k, v, False, 0.25)
    g = torch.randn(out.shape).to(torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(RuntimeError, match=r"grad_output.strides\(\) == output.strides\(\)"):
        kernel_backward(engine, g, q, k, v, out, lse, False, 0.25)


# ------------------------------------------------- varlen kernel calls ----
# Packed documents reach FlashAttention-2 and the memory-efficient kernel as varlen
# calls (cumulative int32 offsets, one launch for the problems of all documents);
# torch.ops.longnet._contract_kernel_forward_varlen/_backward_varlen run one such call
# exactly as given, and _contract_kernel_calls counts the dense and varlen calls.

VARLEN = ["contract_cuda_flash", "contract_cuda_efficient"]


def varlen_problem(engine, lengths, h=2, d=16, dtype=torch.bfloat16, seed=0):
    """(q, k, v, cu, max_len) of sequences of `lengths` (square problems) in the
    kernel's varlen shape: flash (T, H, D), efficient (1, T, H, D)."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = [torch.randn(total, h, d, generator=gen).to(dtype) for _ in range(3)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    if engine == "contract_cuda_efficient":
        q, k, v = q[None], k[None], v[None]
    return q, k, v, cu, max(lengths)


def varlen_forward(engine, q, k, v, cu_q, cu_k, max_q, max_k, causal=True, scale=0.25):
    return torch.ops.longnet._contract_kernel_forward_varlen(
        engine, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale
    )


def kernel_calls(engine):
    dense_calls, varlen_calls = torch.ops.longnet._contract_kernel_calls(engine)
    return dense_calls, varlen_calls


@pytest.mark.parametrize("engine", VARLEN)
def test_varlen_kernel_is_each_sequence_alone_in_the_kernels_lse_layout(engine):
    """Every sequence of a varlen call equals the dense kernel on that sequence alone
    (out, lse, dq, dk, dv bit for bit); lse comes as the varlen kernel writes it: flash
    (H, total_q), efficient (P, H, max_q rounded up to 32) with unspecified padding."""
    lengths = [5, 1, 12, 40]
    q, k, v, cu, m = varlen_problem(engine, lengths)
    out, lse = varlen_forward(engine, q, k, v, cu, cu, m, m)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
    grads = torch.ops.longnet._contract_kernel_backward_varlen(
        engine, g, q, k, v, out, lse, cu, cu, m, m, True, 0.25
    )
    flash = engine == "contract_cuda_flash"
    if flash:
        assert lse.shape == (2, sum(lengths))
    else:
        assert lse.shape == (len(lengths), 2, 64)
    rows = (lambda t: t) if flash else (lambda t: t[0])
    for i, n in enumerate(lengths):
        a = int(cu[i])
        part = [rows(t)[a : a + n][None] for t in (q, k, v)]
        o_i, l_i = kernel_forward(engine, *part, True, 0.25)
        assert torch.equal(rows(out)[a : a + n], o_i[0])
        if flash:
            assert torch.equal(lse[:, a : a + n], l_i[0])
        else:
            assert torch.equal(lse[i, :, :n], l_i[0, :, :n])
            assert torch.isnan(lse[i, :, n:]).all()
        g_i = rows(g)[a : a + n][None]
        d_i = kernel_backward(engine, g_i, *part, o_i, l_i, True, 0.25)
        for got, want in zip(grads, d_i):
            assert torch.equal(rows(got)[a : a + n], want[0])


@pytest.mark.parametrize("engine", VARLEN)
def test_varlen_kernel_checks_the_offsets_as_a_gpu_reads_them(engine):
    q, k, v, cu, m = varlen_problem(engine, [8, 24])
    with pytest.raises(RuntimeError, match="cu_seqlens_q must have dtype int32"):
        varlen_forward(engine, q, k, v, cu.long(), cu, m, m)
    strided = torch.zeros(6, dtype=torch.int32)[::2]
    strided.copy_(cu)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must be a contiguous 1-d tensor"):
        varlen_forward(engine, q, k, v, cu, strided, m, m)
    with pytest.raises(RuntimeError, match="more than max_seqlen_q = 23"):
        varlen_forward(engine, q, k, v, cu, cu, 23, m)
    short = torch.tensor([0, 8, 20], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"must run from 0 to the packed rows \(32\)"):
        varlen_forward(engine, q, k, v, short, short, m, m)
    wrong_shape = q[0] if engine == "contract_cuda_efficient" else q[None]
    with pytest.raises(RuntimeError, match="batch_size=1" if wrong_shape.dim() == 3 else "total"):
        varlen_forward(engine, wrong_shape, k, v, cu, cu, m, m)
    buf = torch.zeros(*q.shape[:-1], 17, dtype=q.dtype)
    buf[..., 1:] = q
    with pytest.raises(RuntimeError, match="misaligned address: the kernel reads query"):
        varlen_forward(engine, buf[..., 1:], k, v, cu, cu, m, m)


def test_flash_varlen_backward_reads_lse_contiguous():
    """mha_varlen_bwd reads softmax_lse as a contiguous (H, total_q) tensor."""
    engine = "contract_cuda_flash"
    q, k, v, cu, m = varlen_problem(engine, [8, 24])
    out, lse = varlen_forward(engine, q, k, v, cu, cu, m, m)
    transposed = lse.t().contiguous().t()
    with pytest.raises(RuntimeError, match="softmax_lse must be a contiguous"):
        torch.ops.longnet._contract_kernel_backward_varlen(
            engine, out, q, k, v, out, transposed, cu, cu, m, m, True, 0.25
        )


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("engine", CONTRACT)
def test_packed_documents_make_the_same_kernel_calls_for_any_number_of_documents(engine, causal):
    """Flash and the efficient kernel run packed documents as varlen calls, one per
    group of problems that share pattern, head set and mask: 64 documents make no more
    calls than 2 and no dense call. cuDNN (no varlen) runs each document on its own."""
    from test_varlen import HK, RS, WS, D, H

    def calls(num_docs):
        lengths = torch.full((num_docs,), 2 * max(WS) + 5)  # every kind of segment
        cu = longnet.packing.cu_seqlens_from_lengths(lengths)
        gen = torch.Generator().manual_seed(num_docs)
        total = int(cu[-1])
        q = torch.randn(1, total, H, D, generator=gen).to(torch.bfloat16).requires_grad_()
        k, v = [torch.randn(1, total, HK, D, generator=gen).to(torch.bfloat16) for _ in "kv"]
        before = kernel_calls(engine)
        with longnet.testing.use_engine(engine):
            out, lse = longnet.dilated_attention(
                q, k, v, WS, RS, is_causal=causal, return_lse=True, cu_seqlens_q=cu, cu_seqlens_k=cu
            )
            (out.float().sum() + lse.sum()).backward()
        after = kernel_calls(engine)
        return after[0] - before[0], after[1] - before[1]

    few, many = calls(2), calls(64)
    if engine == "contract_cuda_cudnn":
        assert few[1] == many[1] == 0 and many[0] > 16 * few[0]
        return
    assert few[0] == many[0] == 0, "no dense kernel call"
    assert 0 < many[1] == few[1]


@pytest.mark.parametrize("packed", [False, True], ids=["one-sequence", "packed"])
def test_backward_without_a_loss_on_lse_runs_no_pass_for_it(packed):
    """The lse gradient costs one more dense backward per problem. A loss that does not
    read lse gives the operator no grad_lse (not zeros), so no such pass runs and
    nothing is read back to decide (on a GPU that would wait for the device): the
    backward makes half the kernel calls of one whose loss reads lse, and the same
    gradients as a loss that reads lse with weight 0."""
    engine = "contract_cuda_flash"
    q, k, v = [t.requires_grad_() for t in problem(1, 40, 40, 2, 16, torch.bfloat16, seed=4)]
    cu = torch.tensor([0, 17, 40])
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu) if packed else {}

    from torch.utils._python_dispatch import TorchDispatchMode

    class GradLseSeen(TorchDispatchMode):
        """Records the grad_lse argument of every backward operator call."""

        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.longnet.dilated_attention_bwd.default:
                self.seen.append(args[1])
            return func(*args, **(kwargs or {}))

    def backward_calls(lse_weight):
        with longnet.testing.use_engine(engine):
            out, lse = longnet.dilated_attention(
                q, k, v, [8, 16], [1, 2], is_causal=True, return_lse=True, **kw
            )
        loss = out.float().sum()
        if lse_weight is not None:
            loss = loss + lse_weight * lse.sum()
        before = sum(kernel_calls(engine))
        with GradLseSeen() as mode:
            grads = torch.autograd.grad(loss, (q, k, v))
        (grad_lse,) = mode.seen
        assert (grad_lse is None) == (lse_weight is None)
        return sum(kernel_calls(engine)) - before, grads

    without, grads_without = backward_calls(None)
    with_lse, _ = backward_calls(1.0)
    _, grads_zero_weight = backward_calls(0.0)  # zeros: on the CPU the pass is skipped too
    assert 0 < without and with_lse == 2 * without
    for a, b in zip(grads_without, grads_zero_weight):
        assert torch.equal(a, b)
