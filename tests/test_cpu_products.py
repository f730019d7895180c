"""The fused CPU kernels' products: oneDNN micro-kernels (``brgemm``), the Fortran BLAS
path and portable loops, each against the float64 reference.

``torch.ops.longnet._cpu_products()`` names the products of this thread's last fused CPU
call, ``_cpu_products_for(dtype, head_dim)`` those a call would use now. Shapes here put
the micro-kernel tiles (64 queries x 256 keys) at their edges: odd query and key tails
(16-bit formats pad the product's inner extent to even with a zero column and row),
several key and query blocks per sparse segment (prepared key blocks reused across
query blocks, a segment's Q^T / dO^T kept across key blocks), grouped heads, dilation
(head offsets), both backward schedules and key ranges.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_op import _rel, low_precision_tolerances

import longnet
from longnet.reference import dilated_attention_reference

PRODUCTS = {
    "brgemm-float32",
    "brgemm-bfloat16",
    "brgemm-float16",
    "blas-float32",
    "blas-float64",
    "portable-float32",
    "portable-float64",
}

# (B, Nq, Nk, H, Hk, D, segment_lengths, dilation_rates)
SHAPES = {
    # one segment of 601 keys: 3 key blocks (the last of 89, odd), 10 query blocks
    # (the last of 25, odd); r = 3 gives head offsets 0, 1, 2 and segments of 200/201
    "long_segment": (1, 601, 601, 3, 3, 64, [601, 601], [1, 3]),
    # several segments and heads per task range, grouped heads, D = 40 (not a
    # multiple of the micro-kernel's 16 columns), Nq < Nk (queries at the end)
    "gqa_d40": (2, 250, 333, 4, 2, 40, [64, 128, 333], [1, 2, 4]),
    # one kv head and few segments: with 4 threads the split backward schedule
    "split_schedule": (1, 520, 600, 3, 1, 16, [300, 600], [1, 2]),
}


def _inputs(shape, dtype, seed=0):
    b, nq, nk, h, hk, d, _, _ = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, nq, h, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, nk, hk, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, nk, hk, d, generator=gen, dtype=torch.float64).to(dtype)
    w_out = torch.randn(b, nq, h, d, generator=gen, dtype=torch.float64).to(dtype).double()
    w_lse = torch.randn(b, h, nq, generator=gen, dtype=torch.float64).float().double()
    return q, k, v, w_out, w_lse


def _errors(shape, dtype, causal, results=None, **kw):
    """Relative-norm errors of out, lse, dq, dk, dv against the float64 reference on
    the same rounded inputs and the same incoming gradients; and the products used.
    ``results``, a list, receives the kernel's out, lse, dq, dk, dv."""
    ws, rs = shape[6], shape[7]
    q, k, v, w_out, w_lse = _inputs(shape, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    refs = [t.double().requires_grad_() for t in (q, k, v)]

    def loss(out, lse):
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        return (out.double() * w_out).sum() + (lse.double() * w_lse).sum()

    out, lse = longnet.dilated_attention(*leaves, ws, rs, is_causal=causal, return_lse=True, **kw)
    grads = torch.autograd.grad(loss(out, lse), leaves)
    used = torch.ops.longnet._cpu_products()
    ref_out, ref_lse = dilated_attention_reference(*refs, ws, rs, is_causal=causal, **kw)
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), refs)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    got = dict(
        out=out, lse=torch.where(finite, lse.double(), 0.0), dq=grads[0], dk=grads[1], dv=grads[2]
    )
    want = dict(
        out=ref_out,
        lse=torch.where(finite, ref_lse, 0.0),
        dq=ref_grads[0],
        dk=ref_grads[1],
        dv=ref_grads[2],
    )
    if results is not None:
        results.extend(got.values())
    return {n: _rel(got[n], want[n]) for n in got}, used


def test_products_are_named():
    # The accessor answers for every dtype; a call reports what it planned.
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for d in (3, 64):
            assert torch.ops.longnet._cpu_products_for(dtype, d) in PRODUCTS
    assert torch.ops.longnet._cpu_products_for(torch.float64, 64).endswith("float64")
    # 16-bit formats pair up the columns of q and dout in place: odd D never reaches
    # their micro-kernel.
    assert not torch.ops.longnet._cpu_products_for(torch.bfloat16, 3).startswith("brgemm")
    q = torch.randn(1, 16, 2, 8)
    longnet.dilated_attention(q, q, q, [8], [1])
    assert torch.ops.longnet._cpu_products() == torch.ops.longnet._cpu_products_for(
        torch.float32, 8
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_products_match_reference(name, causal, dtype):
    # The bounds of test_op.low_precision_tolerances (derived there from each format's
    # unit roundoff; float32: 1e-5). They catch a nonzero padding column or row of a
    # 16-bit product (out/dv off by a key's weight), a prepared key block or a kept
    # Q^T reused for the wrong segment or head (errors of order 1), a missing scale.
    shape = SHAPES[name]
    threads = 4 if name == "split_schedule" else torch.get_num_threads()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        errors, used = _errors(shape, dtype, causal)
    finally:
        torch.set_num_threads(old)
    assert used == torch.ops.longnet._cpu_products_for(dtype, shape[5])
    tol = low_precision_tolerances(dtype)
    assert all(errors[n] < tol[n] for n in errors), (used, errors, tol)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_turned_off_runs_blas_products(dtype):
    # torch.backends.mkldnn.enabled = False makes ATen's 16-bit micro-kernels raise:
    # the kernels must take the BLAS path instead (catches a call that crashes or
    # still reports brgemm), within the format's bounds.
    shape = SHAPES["gqa_d40"]
    with torch.backends.mkldnn.flags(enabled=False):
        assert not torch.ops.longnet._cpu_products_for(dtype, 40).startswith("brgemm")
        errors, used = _errors(shape, dtype, True)
    assert not used.startswith("brgemm"), used
    tol = low_precision_tolerances(dtype)
    assert all(errors[n] < tol[n] for n in errors), (used, errors, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_with_positions_and_key_ranges(dtype):
    # Rows whose keys start inside a segment and a row with no keys at all.
    shape = (3, 200, 300, 2, 2, 32, [96, 300], [1, 2])
    kw = dict(
        position_offset=37,
        key_start=torch.tensor([0, 45, 300]),
        key_end=torch.tensor([300, 290, 300]),
    )
    errors, used = _errors(shape, dtype, True, **kw)
    tol = low_precision_tolerances(dtype)
    assert all(errors[n] < tol[n] for n in errors), (used, errors, tol)


_SUBPROCESS = """
import torch, longnet
from longnet.reference import dilated_attention_reference as ref
gen = torch.Generator().manual_seed(0)
q, k, v = [torch.randn(1, 300, 2, 32, generator=gen, dtype=torch.float64) for _ in range(3)]
qs, ks, vs = [t.float().requires_grad_() for t in (q, k, v)]
o = longnet.dilated_attention(qs, ks, vs, [64, 300], [1, 3], is_causal=True)
g = torch.autograd.grad((o.double() * q).sum(), (qs, ks, vs))
used = torch.ops.longnet._cpu_products()
qd, kd, vd = [t.float().double().requires_grad_() for t in (q, k, v)]
o2, _ = ref(qd, kd, vd, [64, 300], [1, 3], is_causal=True)
g2 = torch.autograd.grad((o2 * q).sum(), (qd, kd, vd))
rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
err = max([rel(o, o2)] + [rel(a, b) for a, b in zip(g, g2)])
print("RESULT", used, err)
"""


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"LONGNET_CPU_BRGEMM": "0"}, "blas-float32"),
        ({"LONGNET_CPU_BLAS": "0"}, "portable-float32"),
    ],
)
def test_switches_select_the_products(env, expected):
    # The switches still work and are visible: LONGNET_CPU_BRGEMM=0 runs float32 on the
    # Fortran BLAS path, LONGNET_CPU_BLAS=0 on portable loops; both within the float32
    # bound (1e-5) of the reference. Catches a switch that is ignored (the name says
    # brgemm) or a fallback that computes something else.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full_env = dict(os.environ, **env)
    full_env["PYTHONPATH"] = root + os.pathsep + full_env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")][-1].split()
    if expected == "blas-float32" and not line[1].startswith("blas"):
        assert line[1] == "portable-float32"  # a torch without a Fortran BLAS
    else:
        assert line[1] == expected
    assert float(line[2]) < 1e-5


def _has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return False
    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= set(flags)


def _bf16_results(monkeypatch, row_pass_env):
    """The bfloat16 run of every shape (full and causal) with LONGNET_CPU_AVX512 set
    to ``row_pass_env`` (None: unset): the pass named, the errors against the float64
    reference and the results themselves (out, lse, dq, dk, dv)."""
    if row_pass_env is None:
        monkeypatch.delenv("LONGNET_CPU_AVX512", raising=False)
    else:
        monkeypatch.setenv("LONGNET_CPU_AVX512", row_pass_env)
    results = {}
    for name in sorted(SHAPES):
        shape = SHAPES[name]
        for causal in (False, True):
            values: list = []
            errors, _ = _errors(shape, torch.bfloat16, causal, values)
            results[(name, causal)] = (errors, values)
    return torch.ops.longnet._cpu_bf16_row_pass(), results


def test_bf16_row_passes_both_match_reference(monkeypatch):
    # The bfloat16 softmax passes (P = exp(scale S - m) rounded to bfloat16, and the
    # backward's P and dS pairs) run AVX-512 BF16 code where the processor has it and
    # compiler-vectorised loops otherwise or with LONGNET_CPU_AVX512=0. Both runs must
    # name the pass they took, stay within the bfloat16 bounds of the float64
    # reference on every shape, and agree with each other far inside those bounds.
    # Both round the same polynomial's float32 values to nearest even; they differ by
    # FMA contraction and the order of the row sums, a few float32 ulps, which flips
    # the bfloat16 rounding of a small fraction of the outputs and gradients by one
    # ulp (measured: at most 1e-4 relative in norm). The agreement bound, 2^-11, is
    # 1/8 of bfloat16's unit roundoff: a pass that truncates instead of rounding (a
    # bias of half an ulp on every P, about 2e-3 here), drops a lane, or interleaves
    # the pairs wrongly breaks it, while the reference bounds (u and 2u plus the
    # float32 term) could hide the first. Results that agree bit for bit would mean
    # the switch did not change the code that ran.
    portable_name, portable = _bf16_results(monkeypatch, "0")
    default_name, default = _bf16_results(monkeypatch, None)
    assert portable_name == "portable"
    assert default_name == ("avx512-bf16" if _has_avx512_bf16() else "portable")
    tol = low_precision_tolerances(torch.bfloat16)
    for row_pass, run in ((default_name, default), (portable_name, portable)):
        for case, (errors, _) in run.items():
            assert all(errors[n] < tol[n] for n in errors), (row_pass, case, errors, tol)
    differences = [
        _rel(a, b) for case in default for a, b in zip(default[case][1], portable[case][1])
    ]
    assert max(differences) < 2.0**-11, differences
    if default_name != portable_name:  # the switch changed the code that ran
        assert max(differences) > 0.0


def test_tile_gemm_benchmark_times_the_kernels_tiles(tmp_path):
    # benchmarks/bench_tile_gemm.py times cpublas::brgemm alone on the fused kernels'
    # tile shapes, the ceiling the README holds the kernels against. It must time every
    # dtype whose kernels run on the micro-kernel here, on the three tile shapes of D
    # and of the tiles the kernels report (_cpu_tile_sizes: 64 queries, 256 keys),
    # and report a finite positive rate for each (a call with the wrong operand layout
    # or leading dimensions fails inside oneDNN or returns no rate).
    from benchmarks import bench_tile_gemm

    planned = [
        name
        for name in ("float32", "bfloat16")
        if torch.ops.longnet._cpu_products_for(getattr(torch, name), 48).startswith("brgemm")
    ]
    if not planned:
        pytest.skip("no oneDNN micro-kernel on this machine")
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        pytest.skip("the benchmark compiles its timing loop with ninja (pip install ninja)")
    assert (
        bench_tile_gemm.main(["--head-dim", "48", "--seconds", "0.01", "--out", str(tmp_path)]) == 0
    )
    with open(tmp_path / "cpu_tile_gemm.json") as f:
        result = json.load(f)
    assert result["head_dim"] == 48
    shapes = [(r["M"], r["N"], r["K"]) for r in result["records"]]
    assert shapes == [(64, 256, 48), (48, 256, 64), (64, 48, 256)]
    for rec in result["records"]:
        for name in planned:
            assert 0.0 < rec[name] < float("inf"), rec
