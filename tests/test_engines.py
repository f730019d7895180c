"""Engines (docs/operator.md, "Engines"): the composition of dense problems over
strided views, run on ATen's CPU flash attention (`cpu_flash`) and on plain
matmul/softmax (`math`), against the float64 reference; choice and forcing of
engines. The CUDA engines are tested in tests/test_cuda.py."""

import os
import subprocess
import sys
from unittest import mock

import pytest
import test_op
import torch
from test_op import (
    CASES,
    _low_precision_run,
    _rel,
    assert_matches,
    loss_on_both,
    low_precision_tolerances,
    make_inputs,
    opcheck_backward,
    run_both,
)

import longnet
import longnet.testing
from longnet.reference import dilated_attention_reference

COMPOSED = ["cpu_flash", "math"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_on(engine, fn, *args, **kwargs):
    """fn(*args) with `engine` forced; checks that every forward ran on it (the engine
    is read as each longnet.dilated_attention call returns, before any backward) and
    that the backward did (the last call of fn is its backward)."""
    forwards = []
    real = longnet.dilated_attention

    def forward(*a, **kw):
        result = real(*a, **kw)
        forwards.append(longnet.last_engine())
        return result

    with mock.patch.object(longnet, "dilated_attention", forward), longnet.use_engine(engine):
        result = fn(*args, **kwargs)
    assert forwards and all(name == engine for name in forwards), forwards
    assert longnet.last_engine() == engine
    return result


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("engine", COMPOSED)
def test_matches_reference_float64(engine, name, causal):
    got, want = run_on(engine, run_both, CASES[name], causal)
    assert_matches(got, want)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", ["batch_gqa", "nq_lt_nk", "d40", "mqa"])
@pytest.mark.parametrize("engine", COMPOSED)
def test_non_contiguous_inputs(engine, name, causal):
    got, want = run_on(engine, run_both, CASES[name], causal, packed=True)
    assert_matches(got, want)


@pytest.mark.parametrize("engine", COMPOSED)
def test_custom_scale(engine):
    got, want = run_on(engine, run_both, CASES["batch_gqa"], True, scale=0.37)
    assert_matches(got, want)


@pytest.mark.parametrize("engine", COMPOSED)
def test_rows_without_keys_written(engine):
    # No pattern has r = 1: some rows reach no key. Outputs start as NaN
    # (LONGNET_POISON_OUTPUTS=1, tests/conftest.py), so an unwritten row would show.
    got, want = run_on(engine, run_both, CASES["no_r1_pattern"], False)
    out, lse, _ = got
    assert torch.isneginf(lse).any()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_matches(got, want)


# GQA groups against dilation rates: r dividing H/Hk, H/Hk dividing r, neither, and r > H.
GQA_CASES = {
    "r_divides_group": (2, 24, 24, 8, 2, 8, [8, 24], [2, 4]),
    "group_divides_r": (1, 36, 36, 8, 4, 8, [12, 36], [4, 6]),
    "neither": (1, 36, 36, 6, 2, 8, [9, 36], [2, 9]),
    "r_gt_h_gqa": (1, 40, 40, 4, 2, 8, [20, 40], [1, 10]),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", list(GQA_CASES))
@pytest.mark.parametrize("engine", COMPOSED)
def test_gqa_head_sets(engine, name, causal):
    got, want = run_on(engine, run_both, GQA_CASES[name], causal)
    assert_matches(got, want)


def run_ranges(case, causal, position_offset=0, key_start=None, key_end=None, packed=False):
    """run_both with position_offset and key ranges."""
    b, nq, nk, h, hk, d, ws, rs = case
    q, k, v = make_inputs(b, nq, nk, h, hk, d, packed=packed)
    kw = dict(
        is_causal=causal, position_offset=position_offset, key_start=key_start, key_end=key_end
    )
    out, lse = longnet.dilated_attention(q, k, v, ws, rs, return_lse=True, **kw)
    grads = torch.autograd.grad(loss_on_both(out, lse), (q, k, v))
    ref_out, ref_lse = dilated_attention_reference(q, k, v, ws, rs, **kw)
    ref_grads = torch.autograd.grad(loss_on_both(ref_out, ref_lse), (q, k, v))
    return (out, lse, grads), (ref_out, ref_lse, ref_grads)


RANGE_CASES = {
    # name: (case, position_offset, key_start, key_end)
    "offset_mid_segment": ((2, 30, 30, 4, 2, 8, [8, 16], [1, 2]), 5, None, None),
    "offset_multiple_of_w": ((1, 32, 32, 4, 4, 8, [8, 16], [1, 4]), 16, None, None),
    "offset_decode": ((1, 3, 40, 4, 2, 8, [8, 32], [1, 2]), 13, None, None),
    "ranges": ((3, 20, 36, 4, 2, 8, [8, 16], [1, 2]), 0, [0, 4, 10], [36, 30, 17]),
    "ranges_offset": ((3, 12, 30, 6, 3, 8, [7, 14], [1, 3]), 9, [2, 0, 5], [30, 21, 29]),
    "ranges_short_rows": ((2, 10, 24, 2, 2, 8, [4, 8], [1, 2]), 3, [20, 3], [24, 24]),
    "ranges_empty_row": ((2, 6, 12, 2, 1, 8, [4, 8], [1, 2]), 0, [5, 0], [5, 12]),
    "ranges_equal_rows": ((3, 16, 40, 2, 2, 8, [8, 16], [1, 2]), 0, [4, 4, 4], [36, 36, 36]),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", list(RANGE_CASES))
@pytest.mark.parametrize("engine", COMPOSED + ["fused"])
def test_position_offset_and_key_ranges(engine, name, causal):
    case, offset, start, end = RANGE_CASES[name]

    def as_tensor(x):
        return None if x is None else torch.tensor(x)

    got, want = run_on(
        engine,
        run_ranges,
        case,
        causal,
        offset,
        as_tensor(start),
        as_tensor(end),
        packed=name == "ranges_offset",
    )
    assert not torch.isnan(got[0]).any()
    assert_matches(got, want)


@pytest.mark.parametrize("engine", COMPOSED)
def test_gradient_on_lse_only(engine):
    # A loss on lse alone: every gradient comes from dlse (the extra dense backward).
    b, nq, nk, h, hk, d, ws, rs = CASES["nq_lt_nk"]
    q, k, v = make_inputs(b, nq, nk, h, hk, d)

    def grads(fn):
        out, lse = fn(q, k, v, ws, rs, is_causal=True)
        w = torch.linspace(-1, 1, lse.numel(), dtype=lse.dtype).view_as(lse)
        return torch.autograd.grad(
            (torch.where(torch.isfinite(lse), lse, 0) * w).sum(), (q, k, v), allow_unused=True
        )

    got = run_on(
        engine, grads, lambda *a, **kw: longnet.dilated_attention(*a, return_lse=True, **kw)
    )
    want = grads(dilated_attention_reference)
    for g, w in zip(got, want):
        torch.testing.assert_close(
            g, torch.zeros_like(g) if w is None else w, atol=1e-10, rtol=1e-9
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("engine", COMPOSED)
def test_low_precision(engine, dtype):
    # tests/test_op.py's case and format-derived bounds for composed engines (one
    # more rounding to the format than the fused kernels: out and dv 2 u, dq and dk
    # 3 u, lse 1e-5), the reference on the same rounded inputs with loss weights
    # exact in the input format. Catches a 1% scale error (out 8.4e-3 > 7.8e-3 in
    # bf16), lse rounded to bf16, gradients summed in the input format.
    got, want = run_on(engine, _low_precision_run, dtype, True)
    assert got["out"].dtype == dtype and got["lse"].dtype == torch.float32
    for name in ("dq", "dk", "dv"):
        assert got[name].dtype == dtype
    tol = low_precision_tolerances(dtype, composed=True)
    errors = {name: _rel(got[name], want[name]) for name in got}
    assert all(errors[name] < tol[name] for name in got), (errors, tol)


# Above the math engine's score budget (2**22 elements of batch x heads x queries x
# keys per step, csrc/engine/engines_cpu.cpp): one segment of N = 1500 with H = Hk = 2
# (the composition puts both heads in one problem; GQA would split them) is one dense
# problem of 2 x 1500 x 1500 = 4.5e6 scores, so math runs it in query chunks of
# 2**22 // 3000 = 1398 rows, one batch row at a time, causal chunks reading keys
# [0, q1).
MATH_CHUNK_CASE = (2, 1500, 1500, 2, 2, 8, [1500], [1])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("engine", COMPOSED)
def test_dense_problem_above_the_math_score_budget(engine, causal):
    b, nq, nk, h, hk, d, ws, rs = MATH_CHUNK_CASE
    assert h * nq * nk > 2**22 and nq * nk < 2**22 < 2 * nq * nk
    got, want = run_on(engine, run_both, MATH_CHUNK_CASE, causal)
    assert_matches(got, want)


@pytest.mark.parametrize("nk", [0, 5])
@pytest.mark.parametrize("engine", COMPOSED)
def test_empty_sequence(engine, nk):
    # tests/test_op.py's Nq = 0 case (empty outputs, gradients of the inputs' shapes,
    # zero for keys no query reads) on the composed engines.
    run_on(engine, test_op.test_empty_sequence, nk)


@pytest.mark.parametrize("engine", COMPOSED)
def test_opcheck_and_compile(engine):
    b, nq, nk, h, hk, d, ws, rs = CASES["batch_gqa"]
    q, k, v = make_inputs(b, nq, nk, h, hk, d, dtype=torch.float32)
    with longnet.use_engine(engine):
        torch.library.opcheck(
            torch.ops.longnet.dilated_attention_fwd.default, (q, k, v, ws, rs, True, 0.25)
        )
        opcheck_backward(q, k, v, ws, rs)

        def fn(q, k, v):
            return longnet.dilated_attention(q, k, v, ws, rs, is_causal=True, return_lse=True)

        test_op.check_compiled_matches_eager(
            fn, (q, k, v), lambda out, lse: (out * 2).sum() + lse.sum(), (q, k, v)
        )
    assert longnet.last_engine() == engine


# ------------------------------------------------------------- choice ----


def test_cpu_default_is_fused():
    q, k, v = make_inputs(1, 16, 16, 2, 2, 8)
    out = longnet.dilated_attention(q, k, v, [8], [1])
    assert longnet.last_engine() == "fused"
    out.sum().backward()
    assert longnet.last_engine() == "fused"
    with longnet.use_engine("auto"):
        longnet.dilated_attention(q, k, v, [8], [1])
    assert longnet.last_engine() == "fused"


def test_use_engine_nests_and_restores():
    q, k, v = make_inputs(1, 16, 16, 2, 2, 8)
    with longnet.use_engine("math"):
        with longnet.use_engine("cpu_flash"):
            longnet.dilated_attention(q, k, v, [8], [1])
            assert longnet.last_engine() == "cpu_flash"
        longnet.dilated_attention(q, k, v, [8], [1])
        assert longnet.last_engine() == "math"
    longnet.dilated_attention(q, k, v, [8], [1])
    assert longnet.last_engine() == "fused"


def test_backward_on_another_thread_keeps_engine_and_reports_it():
    # Autograd runs CUDA backwards on its own threads: the backward must run on the
    # engine forced at forward time and count as this thread's last call.
    import threading

    q, k, v = make_inputs(1, 16, 16, 2, 2, 8)
    with longnet.use_engine("math"):
        out = longnet.dilated_attention(q, k, v, [8], [1])
    longnet.dilated_attention(q.detach(), k.detach(), v.detach(), [8], [1])
    assert longnet.last_engine() == "fused"
    seen = []

    def backward():
        out.sum().backward()
        seen.append(longnet.last_engine())

    thread = threading.Thread(target=backward)
    thread.start()
    thread.join()
    assert seen == ["math"]
    assert longnet.last_engine() == "math"
    want = torch.autograd.grad(dilated_attention_reference(q, k, v, [8], [1])[0].sum(), (q,))[0]
    torch.testing.assert_close(q.grad, want)


def test_backward_runs_on_the_forward_engine():
    q, k, v = make_inputs(1, 16, 16, 2, 2, 8)
    with longnet.use_engine("cpu_flash"):
        out = longnet.dilated_attention(q, k, v, [8], [1])
    longnet.dilated_attention(q.detach(), k.detach(), v.detach(), [8], [1])
    assert longnet.last_engine() == "fused"
    out.sum().backward()
    assert longnet.last_engine() == "cpu_flash"


def test_engine_names():
    assert set(longnet.engines.ENGINES) == {
        "auto",
        "fused",
        "cpu_flash",
        "math",
        "cuda_flash",
        "cuda_cudnn",
        "cuda_efficient",
    }
    assert longnet.engines.engine_built("math") and longnet.engines.engine_built("cpu_flash")
    assert longnet.engines.engine_built("fused")
    assert longnet.engines.engine_built("cuda_flash") == longnet.HAS_CUDA
    # The engines for tests are reached through longnet.testing only.
    for engine in longnet.testing.CONTRACT_ENGINES:
        assert engine not in longnet.engines.ENGINES and engine in longnet.testing.ENGINES
        with pytest.raises(ValueError, match=f"unknown engine '{engine}'"):
            longnet.engines.engine_built(engine)
        with pytest.raises(ValueError, match=f"unknown engine '{engine}'"):
            with longnet.use_engine(engine):
                pass


def test_contract_engines_outside_a_testing_build_say_how_to_build_one(monkeypatch):
    monkeypatch.setattr(longnet.testing, "TESTING_BUILD", False)
    for engine in longnet.testing.CONTRACT_ENGINES:
        with pytest.raises(RuntimeError, match=f"'{engine}' is compiled only into a testing build"):
            with longnet.testing.use_engine(engine):
                pass
    # longnet.testing.use_engine takes the API's engines in any build.
    with longnet.testing.use_engine("cpu_flash"):
        q = torch.randn(1, 16, 2, 8)
        longnet.dilated_attention(q, q, q, [8], [1])
    assert longnet.last_engine() == "cpu_flash"


def test_unknown_engine_name():
    with pytest.raises(ValueError, match="unknown engine 'flash'.*cpu_flash"):
        with longnet.use_engine("flash"):
            pass


@pytest.mark.parametrize("engine", ["cuda_flash", "cuda_cudnn", "cuda_efficient"])
def test_cuda_engine_on_cpu_tensors_raises(engine):
    q, k, v = make_inputs(1, 16, 16, 2, 2, 8, dtype=torch.float32)
    reason = "needs CUDA tensors" if longnet.HAS_CUDA else "not built"
    with longnet.use_engine(engine):
        with pytest.raises(
            RuntimeError, match=f"engine '{engine}' .*cannot run this call: .*{reason}"
        ):
            longnet.dilated_attention(q, k, v, [8], [1])


def _run_env(env_engine, code):
    env = dict(os.environ, LONGNET_ENGINE=env_engine)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


ENV_CODE = (
    "import torch, longnet\n"
    "q = torch.randn(1, 24, 2, 8, dtype=torch.float64, requires_grad=True)\n"
    "out = longnet.dilated_attention(q, q, q, [8, 24], [1, 2], is_causal=True)\n"
    "print('forward', longnet.last_engine())\n"
    "out.sum().backward()\n"
    "print('backward', longnet.last_engine())\n"
    "with longnet.use_engine('fused'):\n"
    "    longnet.dilated_attention(q, q, q, [8], [1])\n"
    "print('forced', longnet.last_engine())\n"
)


@pytest.mark.parametrize("engine", ["math", "cpu_flash"])
def test_env_var_forces_engine(engine):
    res = _run_env(engine, ENV_CODE)
    assert res.returncode == 0, res.stderr
    assert f"forward {engine}\nbackward {engine}\nforced fused" in res.stdout


def test_env_var_errors():
    res = _run_env("bogus", ENV_CODE)
    assert res.returncode != 0
    assert "unknown engine 'bogus' (from LONGNET_ENGINE)" in res.stderr
    res = _run_env("cuda_efficient", ENV_CODE)
    assert res.returncode != 0
    assert "engine 'cuda_efficient' (forced by LONGNET_ENGINE) cannot run this call" in res.stderr


def test_gpu_benchmark_imports_and_counts_flops():
    # benchmarks/bench_gpu.py needs a GPU to run; its CPU-side parts are checked here.
    sys.path.insert(0, ROOT)
    from benchmarks import bench_gpu

    assert set(bench_gpu.ENGINE_BACKEND) == {"cuda_flash", "cuda_cudnn", "cuda_efficient"}
    # One pattern w = N, r = 1: dense attention, 4 N^2 H D FLOPs, half of it causal.
    assert bench_gpu.needed_flops(1024, 2, 64, [1024], [1], False) == 4.0 * 1024**2 * 2 * 64
    assert bench_gpu.needed_flops(1024, 2, 64, [1024, 2048], [1, 2], True) == (
        2.0 * 1024**2 * 2 * 64 * (1 + 1 / 4)
    )
    # The packed-documents problem: positive lengths that fill N exactly.
    lengths = bench_gpu.document_lengths(65536, 2048)
    assert sum(lengths) == 65536 and min(lengths) >= 1 and 10 < len(lengths) < 200
