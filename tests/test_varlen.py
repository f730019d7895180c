"""Packed documents (docs/operator.md, "Packed documents"): ``cu_seqlens_q`` /
``cu_seqlens_k`` pack S documents into one row, each attended as if alone.

Every CPU engine runs randomized packed batches (1 to 64 documents of 0 to 3 max(w)
keys, some with fewer queries than keys, GQA, causal and not, every dtype the engine
takes). Each batch is checked twice:

* against the float64 reference run document by document on the same rounded inputs,
  at the engine's format-derived bounds (tests/test_op.py for the fused kernels and
  the composed engines, tests/test_contract_engines.py for the contract engines);
  this catches a document boundary off by one, a position not restarted at a
  document, keys read across documents, an unwritten row (outputs start as NaN,
  tests/conftest.py) or a wrong gradient;
* bit for bit against the same engine on each document alone (fresh tensors): the
  issue's "identical results" claim, which a shifted or merged document would break
  even where the bounds above leave room. The engines with varlen calls
  (contract_cuda_flash, contract_cuda_efficient) run all documents' problems in one
  call and merge them with the same float32 operations in the same order, but on
  gathered rows, where ATen's vectorized exp/log and the scalar ones of a strided view
  can differ in the last float32 bit. For them the bound is one float32 rounding:
  lse within 2^-23 in relative norm, out and the gradients within u / 16 (float32:
  2^-20), where a float32 difference can only flip the format's rounding of a few
  elements (measured at most 1.45e-8 for lse and 1.2e-5 for the rest, bf16 and fp16).
  A document shifted or read across gives differences of order one.
"""

import pytest
import torch
from test_contract_engines import tolerances as contract_tolerances
from test_op import low_precision_tolerances, require_testing_build

import longnet
import longnet.testing
from longnet.packing import (
    cu_seqlens_from_lengths,
    cu_seqlens_from_position_ids,
    document_ids,
    document_positions,
)
from longnet.reference import dilated_attention_reference

WS, RS = [4, 8, 16], [1, 2, 4]
H, HK, D = 6, 2, 16
ENGINE_DTYPES = {
    "fused": [torch.float64, torch.float32, torch.bfloat16, torch.float16],
    "cpu_flash": [torch.float64, torch.float32, torch.bfloat16, torch.float16],
    "math": [torch.float64, torch.float32, torch.bfloat16, torch.float16],
    "contract_cuda_flash": [torch.bfloat16, torch.float16],
    "contract_cuda_efficient": [torch.float32, torch.bfloat16, torch.float16],
    "contract_cuda_cudnn": [torch.bfloat16, torch.float16],
}
IDS = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# (number of documents, queries per document): all keys, or a random count <= keys.
BATCHES = {"s1": (1, "all"), "s7_nq_lt_nk": (7, "fewer"), "s64": (64, "all")}


def bounds(engine, dtype):
    """Relative-norm bounds against the float64 reference (module docstring)."""
    if dtype == torch.float64:
        return dict.fromkeys(("out", "lse", "dq", "dk", "dv"), 1e-10)
    if engine.startswith("contract_"):
        return contract_tolerances(dtype)
    return low_precision_tolerances(dtype, composed=engine != "fused")


def packed_batch(num_docs, queries, seed):
    """Document lengths and float64 inputs of one packed row: (cu_q, cu_k, q, k, v)."""
    gen = torch.Generator().manual_seed(seed)
    nk = torch.randint(0, 3 * max(WS) + 1, (num_docs,), generator=gen)
    if num_docs > 2:
        nk[1] = 0  # an empty document
    if queries == "all":
        nq = nk.clone()
    else:
        nq = (torch.rand(num_docs, generator=gen, dtype=torch.float64) * (nk + 1)).floor().long()
    cu_q, cu_k = cu_seqlens_from_lengths(nq), cu_seqlens_from_lengths(nk)
    q = torch.randn(1, int(cu_q[-1]), H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(1, int(cu_k[-1]), HK, D, generator=gen, dtype=torch.float64)
    v = torch.randn(1, int(cu_k[-1]), HK, D, generator=gen, dtype=torch.float64)
    return cu_q, cu_k, q, k, v


def loss_weights(q, dtype, seed=1):
    """Weights of out and lse representable in dtype and float32, so every run's
    backward gets exactly the reference's incoming gradients."""
    gen = torch.Generator().manual_seed(seed)
    w_out = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(dtype).double()
    lse_shape = (1, q.shape[2], q.shape[1])
    w_lse = torch.randn(lse_shape, generator=gen, dtype=torch.float64).float().double()
    return w_out, w_lse


def loss(out, lse, w_out, w_lse):
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (out.double() * w_out).sum() + (lse.double() * w_lse).sum()


def forward_backward(fn, q, k, v, w_out, w_lse):
    q, k, v = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fn(q, k, v)
    grads = torch.autograd.grad(loss(out, lse, w_out, w_lse), (q, k, v))
    return dict(zip(("out", "lse", "dq", "dk", "dv"), (out.detach(), lse.detach(), *grads)))


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a))  # -inf lse exactly where expected
    a, b = a[finite], b[finite]
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def each_alone(engine, cu_q, cu_k, q, k, v, w_out, w_lse, causal):
    """The engine on every document alone (fresh contiguous tensors), concatenated."""
    parts = []
    for i in range(len(cu_q) - 1):
        a, b, c, e = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])

        def run(qq, kk, vv):
            with longnet.testing.use_engine(engine):
                return longnet.dilated_attention(
                    qq, kk, vv, WS, RS, is_causal=causal, return_lse=True
                )

        parts.append(
            forward_backward(
                run,
                q[:, a:b].contiguous(),
                k[:, c:e].contiguous(),
                v[:, c:e].contiguous(),
                w_out[:, a:b],
                w_lse[:, :, a:b],
            )
        )
    dims = {"out": 1, "lse": 2, "dq": 1, "dk": 1, "dv": 1}
    return {n: torch.cat([p[n] for p in parts], dim=dims[n]) for n in dims}


def engine_params():
    return [
        pytest.param(e, dt, id=f"{e}-{IDS[dt]}")
        for e, dts in ENGINE_DTYPES.items()
        for dt in dts
        if e in longnet.testing.CONTRACT_ENGINES or longnet.engines.engine_built(e)
    ]


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("engine,dtype", engine_params())
def test_packed_equals_each_document_alone(engine, dtype, causal, batch):
    if engine in longnet.testing.CONTRACT_ENGINES:
        require_testing_build()
    num_docs, queries = BATCHES[batch]
    seed = 1000 * num_docs + 10 * int(causal) + list(ENGINE_DTYPES).index(engine)
    cu_q, cu_k, q64, k64, v64 = packed_batch(num_docs, queries, seed)
    q, k, v = [t.to(dtype) for t in (q64, k64, v64)]
    w_out, w_lse = loss_weights(q, dtype)

    def packed(qq, kk, vv):
        with longnet.testing.use_engine(engine):
            result = longnet.dilated_attention(
                qq,
                kk,
                vv,
                WS,
                RS,
                is_causal=causal,
                return_lse=True,
                cu_seqlens_q=cu_q,
                cu_seqlens_k=cu_k,
            )
        assert longnet.last_engine() == engine
        return result

    got = forward_backward(packed, q, k, v, w_out, w_lse)
    assert longnet.last_engine() == engine  # the backward too

    def reference(qq, kk, vv):
        return dilated_attention_reference(
            qq, kk, vv, WS, RS, is_causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k
        )

    want = forward_backward(reference, *[t.double() for t in (q, k, v)], w_out, w_lse)
    tol = bounds(engine, dtype)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert got[name].shape == want[name].shape, name
        assert got[name].dtype == (
            want[name].dtype
            if dtype == torch.float64
            else (torch.float32 if name == "lse" else dtype)
        ), name
        if want[name].numel():
            assert rel(got[name], want[name]) <= tol[name], (name, rel(got[name], want[name]))

    alone = each_alone(engine, cu_q, cu_k, q, k, v, w_out, w_lse, causal)
    varlen = engine in ("contract_cuda_flash", "contract_cuda_efficient")
    for name in ("out", "lse", "dq", "dk", "dv"):
        if not varlen:
            assert torch.equal(got[name], alone[name]), name
        elif alone[name].numel():
            assert rel(got[name], alone[name]) <= varlen_bound(name, dtype), name


def varlen_bound(name, dtype):
    """Packed against alone on an engine with varlen calls (module docstring)."""
    if name == "lse":
        return 2.0**-23
    return 2.0**-20 if dtype == torch.float32 else low_precision_unit(dtype) / 16


def low_precision_unit(dtype):
    return {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]


def test_keys_of_documents_without_queries_get_zero_gradients():
    """A document with keys but no queries: its dk, dv rows are exactly 0 (they start
    as NaN under the poison of tests/conftest.py), and no other document reads them."""
    cu_q = torch.tensor([0, 5, 5, 12])
    cu_k = torch.tensor([0, 9, 20, 30])
    q = torch.randn(1, 12, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 30, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 30, 2, 8, dtype=torch.float64, requires_grad=True)
    out = longnet.dilated_attention(q, k, v, [4], [1], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out.sum().backward()
    assert torch.equal(k.grad[:, 9:20], torch.zeros_like(k.grad[:, 9:20]))
    assert torch.equal(v.grad[:, 9:20], torch.zeros_like(v.grad[:, 9:20]))
    assert (k.grad[:, :9] != 0).any() and (v.grad[:, 20:] != 0).any()


def test_documents_restart_segments_and_positions():
    """Segments restart at every document: a document that starts mid-segment of the
    packed row gives what it gives at the start of a row (position_offset = 0), and not
    what the same tokens give at their packed positions."""
    ws, rs = [8], [2]
    torch.manual_seed(0)
    q = torch.randn(1, 19, 2, 8, dtype=torch.float64)
    k, v = torch.randn_like(q), torch.randn_like(q)
    cu = torch.tensor([0, 3, 19])
    packed = longnet.dilated_attention(q, k, v, ws, rs, is_causal=True, cu_seqlens_q=cu)
    alone = longnet.dilated_attention(q[:, 3:], k[:, 3:], v[:, 3:], ws, rs, is_causal=True)
    torch.testing.assert_close(packed[:, 3:], alone, rtol=0, atol=1e-12)
    shifted = longnet.dilated_attention(
        q[:, 3:], k[:, 3:], v[:, 3:], ws, rs, is_causal=True, position_offset=3
    )
    assert (packed[:, 3:] - shifted).abs().max() > 1e-3


def test_gradcheck_packed():
    cu_q, cu_k = torch.tensor([0, 3, 3, 9]), torch.tensor([0, 4, 6, 13])
    q = torch.randn(1, 9, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 13, 1, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 13, 1, 4, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v):
        return longnet.dilated_attention(
            q,
            k,
            v,
            [2, 4],
            [1, 2],
            is_causal=True,
            return_lse=True,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
        )

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_opcheck_packed():
    cu = torch.tensor([0, 5, 5, 16], dtype=torch.int32)
    q = torch.randn(1, 16, 4, 8, requires_grad=True)
    k = torch.randn(1, 16, 2, 8, requires_grad=True)
    v = torch.randn(1, 16, 2, 8, requires_grad=True)
    args = (q, k, v, [4, 8], [1, 2], True, 0.35, 0, None, None, cu, cu)
    torch.library.opcheck(torch.ops.longnet.dilated_attention_fwd.default, args)
    with torch.no_grad():
        out, lse = torch.ops.longnet.dilated_attention_fwd.default(*args)
    grads = (torch.randn_like(out), torch.randn_like(lse))
    inputs = (q.detach(), k.detach(), v.detach(), out, lse)
    bwd_args = (*grads, *inputs, [4, 8], [1, 2], True, 0.35, 0, None, None, cu, cu)
    torch.library.opcheck(torch.ops.longnet.dilated_attention_bwd.default, bwd_args)


def test_torch_compile_does_not_recompile_per_batch():
    """The number of documents changes from batch to batch: after the first change
    (which makes the offsets' length dynamic) no batch compiles again, and every
    compiled result equals eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(q, k, v, cu):
        out = longnet.dilated_attention(q, k, v, WS, RS, is_causal=True, cu_seqlens_q=cu)
        return out.square().sum()

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    counts = []
    for num_docs, seed in [(3, 0), (5, 1), (2, 2), (9, 3), (4, 4)]:
        gen = torch.Generator().manual_seed(seed)
        cuts = torch.randint(0, 64, (num_docs - 1,), generator=gen).sort().values
        cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([64])])
        q = torch.randn(1, 64, 4, 8, generator=gen, requires_grad=True)
        k = torch.randn(1, 64, 2, 8, generator=gen, requires_grad=True)
        v = torch.randn(1, 64, 2, 8, generator=gen, requires_grad=True)
        got = compiled(q, k, v, cu)
        got_grads = torch.autograd.grad(got, (q, k, v))
        want = step(q, k, v, cu)
        want_grads = torch.autograd.grad(want, (q, k, v))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        counts.append(counter.frame_count)
    assert counts[1] <= 2 and counts[-1] == counts[1], counts


# ----------------------------------------------------------------- errors ----


def _qkv(nq=12, nk=12):
    q = torch.randn(1, nq, 4, 8)
    k = torch.randn(1, nk, 2, 8)
    return q, k, torch.randn_like(k)


ERRORS = {
    "decreasing": (dict(cu_seqlens_q=torch.tensor([0, 7, 3, 12])), "nondecreasing"),
    "past_the_tensor": (dict(cu_seqlens_q=torch.tensor([0, 20, 12])), "nondecreasing"),
    "last_not_total": (dict(cu_seqlens_q=torch.tensor([0, 5, 10])), r"\[-1\] must equal"),
    "first_not_zero": (dict(cu_seqlens_q=torch.tensor([2, 5, 12])), r"\[0\] must be 0"),
    "float_dtype": (dict(cu_seqlens_q=torch.tensor([0.0, 12.0])), "int32 or int64"),
    "two_dims": (dict(cu_seqlens_q=torch.tensor([[0, 12]])), r"shape \(S\+1,\)"),
    "other_device": (dict(cu_seqlens_q=torch.tensor([0, 12], device="meta")), "device of q"),
    "unequal_counts": (
        dict(cu_seqlens_q=torch.tensor([0, 12]), cu_seqlens_k=torch.tensor([0, 6, 12])),
        "as many documents",
    ),
    "more_queries_than_keys": (
        dict(cu_seqlens_q=torch.tensor([0, 8, 12]), cu_seqlens_k=torch.tensor([0, 6, 12])),
        "document 0 has more queries",
    ),
    "with_key_ranges": (
        dict(cu_seqlens_q=torch.tensor([0, 12]), key_end=torch.tensor([10])),
        "cannot be combined with key_start/key_end",
    ),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_offsets_raise_naming_the_argument(name):
    kwargs, message = ERRORS[name]
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=message):
        longnet.dilated_attention(q, k, v, [4], [1], **kwargs)


def test_batch_must_be_one_row():
    q = torch.randn(2, 12, 4, 8)
    k = torch.randn(2, 12, 2, 8)
    with pytest.raises(ValueError, match=r"shape \(1, total_q, H, D\)"):
        longnet.dilated_attention(q, k, k, [4], [1], cu_seqlens_q=torch.tensor([0, 12]))


def test_missing_k_offsets_need_equal_lengths():
    q, k, v = _qkv(nq=8, nk=12)
    with pytest.raises(ValueError, match="cu_seqlens_k may be omitted only"):
        longnet.dilated_attention(q, k, v, [4], [1], cu_seqlens_q=torch.tensor([0, 8]))


# The compiled operator checks the same things (for callers that skip the wrapper).
OP_ERRORS = {
    "decreasing": ((torch.tensor([0, 7, 3, 12]),) * 2, "nondecreasing"),
    "last_not_total": ((torch.tensor([0, 5, 10]),) * 2, r"\[-1\] must equal"),
    "float_dtype": ((torch.tensor([0.0, 12.0]),) * 2, "int32 or int64"),
    "only_one": ((torch.tensor([0, 12]), None), "must be given together"),
    "more_queries_than_keys": (
        (torch.tensor([0, 8, 12]), torch.tensor([0, 6, 12])),
        "more queries",
    ),
}


@pytest.mark.parametrize("name", list(OP_ERRORS))
def test_operator_checks_offsets(name):
    (cu_q, cu_k), message = OP_ERRORS[name]
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.longnet.dilated_attention_fwd.default(
            q, k, v, [4], [1], False, 0.35, 0, None, None, cu_q, cu_k
        )


def test_operator_refuses_offsets_with_key_ranges():
    q, k, v = _qkv()
    cu = torch.tensor([0, 12])
    with pytest.raises(RuntimeError, match="cannot be combined"):
        torch.ops.longnet.dilated_attention_fwd.default(
            q, k, v, [4], [1], False, 0.35, 0, torch.tensor([0]), None, cu, cu
        )


# -------------------------------------------------------------- utilities ----


def test_packing_utilities():
    cu = cu_seqlens_from_lengths([3, 0, 2, 4])
    assert cu.tolist() == [0, 3, 3, 5, 9]
    assert document_ids(cu, 9).tolist() == [0, 0, 0, 2, 2, 3, 3, 3, 3]
    assert document_positions(cu, 9).tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    # transformers' DataCollatorWithFlattening position ids: restarts at 0, and a jump
    # that does not continue the count also starts a document.
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 7, 8]])
    assert cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 5, 9, 11]
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        cu_seqlens_from_lengths([2, -1])
    with pytest.raises(ValueError, match=r"\[-1\] must equal"):
        document_positions(cu, 10)


def test_empty_row_and_all_empty_documents():
    q = torch.randn(1, 0, 4, 8, requires_grad=True)
    k = torch.randn(1, 0, 2, 8, requires_grad=True)
    v = torch.randn(1, 0, 2, 8, requires_grad=True)
    cu = torch.tensor([0, 0, 0])
    out, lse = longnet.dilated_attention(q, k, v, [4], [1], return_lse=True, cu_seqlens_q=cu)
    assert out.shape == (1, 0, 4, 8) and lse.shape == (1, 4, 0)
    # The backward of a row of empty documents runs and gives empty gradients.
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    assert [tuple(g.shape) for g in grads] == [(1, 0, 4, 8), (1, 0, 2, 8), (1, 0, 2, 8)]


# ------------------------------------------------- PackedDocuments, host reads ----


class _CountsHostReads(torch.Tensor):
    """An offsets tensor that counts the reads of its values (or of an integer tensor
    derived from it) back to the host: ``tolist``, ``item``, ``int``/``bool``, ``cpu``,
    ``numpy``, iteration. Integer results stay this class so derived offsets (lengths,
    slices) count too; float results (attention outputs) come back plain. The C++
    kernels' read of a CPU tensor's memory (no copy, no synchronisation) is not seen."""

    reads = 0
    _READS = {"tolist", "item", "__int__", "__bool__", "__index__", "cpu", "numpy", "__iter__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in cls._READS:
            cls.reads += 1
        with torch._C.DisableTorchFunctionSubclass():
            ret = func(*args, **(kwargs or {}))

        def wrap(t):
            if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dtype != torch.bool:
                return t.as_subclass(cls)
            return t

        return tuple(wrap(t) for t in ret) if isinstance(ret, tuple) else wrap(ret)


def _counting(cu):
    _CountsHostReads.reads = 0
    return cu.clone().as_subclass(_CountsHostReads)


def test_counting_tensor_counts_the_reads_of_derived_offsets():
    # The probe the next test relies on: it must see reads through derived tensors.
    cu = _counting(cu_seqlens_from_lengths([3, 4]))
    (cu[1:] - cu[:-1]).tolist()
    int(cu[-1])
    assert _CountsHostReads.reads == 2


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "act_ckpt"])
def test_packed_lm_reads_the_offsets_once_per_forward(checkpointing):
    """A packed LongNetLM forward + backward (rotary, 3 layers, activation
    checkpointing recomputing every layer) reads the offsets back at most once: the
    LM builds one PackedDocuments and the layers, the operator and the recompute use
    its host offsets. (Before: every layer read them several times.)"""
    from longnet.model import LongNetConfig, LongNetLM

    torch.manual_seed(0)
    config = LongNetConfig(
        vocab_size=50, embed_dim=32, num_heads=4, num_layers=3, ffn_dim=64,
        segment_lengths=[4, 8], dilation_rates=[1, 2],
    )  # fmt: skip
    model = LongNetLM(config)
    if checkpointing:
        model.set_activation_checkpointing(True)
    ids = torch.randint(0, 50, (1, 30))
    cu = _counting(cu_seqlens_from_lengths([7, 0, 12, 11]))
    _, loss = model(ids, ids, cu_seqlens=cu)
    loss.backward()
    assert _CountsHostReads.reads <= 1, _CountsHostReads.reads
    # The same row given the offsets as a PackedDocuments reads nothing.
    from longnet.packing import PackedDocuments

    docs = PackedDocuments.from_cu_seqlens(cu)
    _CountsHostReads.reads = 0
    model.zero_grad()
    _, loss2 = model(ids, ids, cu_seqlens=docs)
    loss2.backward()
    assert _CountsHostReads.reads == 0
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)


def test_packed_documents_object():
    from longnet.packing import PackedDocuments, as_packed_documents

    docs = PackedDocuments.from_lengths([3, 0, 2, 4])
    assert docs.offsets == (0, 3, 3, 5, 9) and docs.total == 9 and docs.max_seqlen == 4
    assert docs.cu_seqlens.tolist() == [0, 3, 3, 5, 9] and docs.cu_seqlens.dtype == torch.int64
    assert docs.positions().tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert docs.document_ids().tolist() == document_ids(docs.cu_seqlens, 9).tolist()
    assert len(docs) == 4 and "4 documents, 9 tokens, max_seqlen=4" in repr(docs)
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert PackedDocuments.from_position_ids(pos).offsets == (0, 3, 5, 9)
    # One set of messages: the object and the tensor checks name the same things.
    with pytest.raises(ValueError, match="nondecreasing"):
        PackedDocuments.from_cu_seqlens(torch.tensor([0, 5, 3]))
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal .*\(10\), got 9"):
        PackedDocuments.from_cu_seqlens(torch.tensor([0, 4, 9]), total=10)
    with pytest.raises(ValueError, match="int32 or int64"):
        PackedDocuments.from_cu_seqlens(torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        PackedDocuments.from_lengths([2, -1])
    with pytest.raises(
        ValueError, match=r"cu_seqlens\[-1\] must equal the number of packed tokens \(8\), got 9"
    ):
        as_packed_documents(docs, 8)


def test_operator_takes_packed_documents():
    """The operator given a PackedDocuments equals the same call with the tensor, and
    a PackedDocuments for the wrong number of queries raises (host check only)."""
    from longnet.packing import PackedDocuments

    torch.manual_seed(1)
    q, k, v = _qkv()
    cu = torch.tensor([0, 5, 5, 12])
    want = longnet.dilated_attention(q, k, v, [4, 8], [1, 2], cu_seqlens_q=cu)
    docs = PackedDocuments.from_cu_seqlens(cu)
    got = longnet.dilated_attention(q, k, v, [4, 8], [1, 2], cu_seqlens_q=docs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    q8, k12, v12 = _qkv(nq=8, nk=12)
    docs_q = PackedDocuments.from_lengths([3, 0, 5])
    with pytest.raises(ValueError, match="document 0 has more queries"):
        longnet.dilated_attention(
            q8, k12, v12, [4], [1],
            cu_seqlens_q=docs_q, cu_seqlens_k=PackedDocuments.from_lengths([2, 5, 5]),
        )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"cu_seqlens_q\[-1\] must equal the number of packed tokens \(12\), got 8"
    ):
        longnet.dilated_attention(q, k, v, [4], [1], cu_seqlens_q=docs_q)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "engine,dtype",
    [
        ("contract_cuda_flash", torch.bfloat16),
        ("contract_cuda_efficient", torch.float32),
        ("math", torch.float64),
    ],
    ids=["contract_cuda_flash-bf16", "contract_cuda_efficient-f32", "math-f64"],
)
def test_packed_documents_at_a_position_offset(engine, dtype, causal):
    """Every document's first key at position_offset = 5: segments straddle each
    document's start, so the varlen groups hold partial first segments (and, causal,
    their split into keys before the first query and a square problem), with fewer
    queries than keys in some documents. Against the float64 reference."""
    if engine in longnet.testing.CONTRACT_ENGINES:
        require_testing_build()
    cu_q, cu_k, q64, k64, v64 = packed_batch(7, "fewer", seed=77 + int(causal))
    q, k, v = [t.to(dtype) for t in (q64, k64, v64)]
    w_out, w_lse = loss_weights(q, dtype)
    kw = dict(is_causal=causal, position_offset=5, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)

    def packed(qq, kk, vv):
        with longnet.testing.use_engine(engine):
            return longnet.dilated_attention(qq, kk, vv, WS, RS, return_lse=True, **kw)

    def reference(qq, kk, vv):
        return dilated_attention_reference(qq, kk, vv, WS, RS, **kw)

    got = forward_backward(packed, q, k, v, w_out, w_lse)
    want = forward_backward(reference, *[t.double() for t in (q, k, v)], w_out, w_lse)
    tol = bounds(engine, dtype)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert rel(got[name], want[name]) <= tol[name], (name, rel(got[name], want[name]))
