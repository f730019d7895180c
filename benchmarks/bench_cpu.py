#!/usr/bin/env python3
"""CPU benchmark of ``longnet.dilated_attention`` against two PyTorch baselines.

Implementations compared (float32, forward and forward+backward):

* ``longnet``      the extension's CPU kernel (``longnet.dilated_attention``).
* ``gather_sdpa``  the official LongNet recipe in plain PyTorch: gather sparse
  segments, run SDPA on them, scatter, merge by lse (``benchmarks/gather_sdpa.py``).
* ``dense_sdpa``   ``torch.nn.functional.scaled_dot_product_attention`` over the whole
  sequence (causal when the case is), while it fits in time (``--dense-max-n``).
* ``segment_sdpa`` (``gflops`` case) SDPA on a batch of sequences one segment long:
  the same work as one dilated pattern with ``r = 1``.
* ``mm``           ``torch.mm`` of two square float32 matrices: the machine's
  matrix-multiply rate, the ceiling to compare GFLOP/s against.
* ``longnet_cpu_flash``, ``longnet_math`` (``engines`` case) the operator on the
  composition of dense problems over strided views (``longnet.use_engine``), on ATen's
  CPU flash attention and on plain matmul/softmax, beside ``longnet`` (the fused
  kernels, the CPU default): which engine wins where.

Method. Every measurement runs in a fresh Python subprocess (``--worker``), so one
implementation's allocator cache cannot hide another's memory. The subprocess builds
the inputs (after one call on tiny inputs that starts thread pools and lazy library
state), resets Linux's peak-RSS mark (``/proc/self/clear_refs``), runs one
cold call and reports ``VmHWM - VmRSS(before)``: the peak resident-memory increase over
the inputs, C++ allocations included (outputs and, for fwd+bwd, the input gradients
count as well; they are the same for every implementation). That cold call is also
the warm-up; the time is the median of up to ``--repeats`` further calls (fewer when
they would exceed ``--budget`` seconds, at least one). GFLOP/s counts only the FLOPs
the implementation's pattern needs: per pattern ``4 * B * N * H * D * min(w, N) / r**2``,
halved when causal, backward 2.5x forward (dense SDPA: one pattern ``w = N``).

Cases (``--case``): ``scaling``, ``target1``, ``target2``, ``gflops``, ``engines``,
``peak`` or ``all``. ``peak`` sets the fused kernels' GFLOP/s (needed FLOPs) at the target1
shape, float32 and bfloat16, against the large-GEMM rate of the libraries on this machine
(``gemm``: ``torch.mm`` float32 on MKL, ``mkldnn_linear`` float32 on oneDNN, ``torch.mm``
bfloat16 on oneDNN, 2048^3, the best of 20 calls) and dense causal SDPA of about the
same FLOPs, with the kernels' products on oneDNN's micro-kernels (``brgemm``) and, measured in turn beside
them, on the Fortran BLAS path (``blas``, ``LONGNET_CPU_BRGEMM=0``); bfloat16 also with
its softmax row passes on the portable loops instead of the AVX-512 BF16 code
(``portable_rows``, ``LONGNET_CPU_AVX512=0``; the same code where the processor lacks
AVX-512 BF16).
Results are printed as markdown tables, saved as JSON (``<out>/cpu_<case>.json``) and
plotted (``<out>/cpu_<case>.png``). ``--quick`` runs tiny sizes as a smoke test.

    python3 benchmarks/bench_cpu.py --case all                # the full run
    python3 benchmarks/bench_cpu.py --case target1 --threads 2
    python3 benchmarks/bench_cpu.py --quick                   # seconds, tiny sizes
    python3 benchmarks/bench_cpu.py --case engines            # fused vs composition
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import (  # noqa: E402
    PeakRSS,
    dense_flops,
    machine_info,
    markdown_table,
    median,
    mem_available_bytes,
    pattern_flops,
    time_calls,
)

CASES = ("scaling", "target1", "target2", "gflops", "engines", "peak")
GEMMS = ("mkl_float32", "onednn_float32", "onednn_bfloat16")
GEMM_REPEATS = 20  # timed repeats of each large-GEMM reference (best one kept)
MODES = ("fwd", "fwdbwd")
ALL_IMPLS = ("longnet", "gather_sdpa", "dense_sdpa")
ENGINE_IMPLS = ("longnet", "longnet_cpu_flash", "longnet_math")


# --------------------------------------------------------------------------- cases


def case_configs(case: str, quick: bool) -> dict[str, object]:
    """Shapes and patterns of one case (tiny ones with ``quick``)."""
    # dense SDPA cannot run at the targets' full N; --quick leaves it out there too
    target_impls = ALL_IMPLS[:2] if quick else ALL_IMPLS
    if case == "scaling":
        if quick:
            return dict(
                B=1,
                H=2,
                D=32,
                causal=True,
                ws=[256, 512, 1024],
                rs=[1, 2, 4],
                Ns=[2048, 4096],
                ref_n=2048,
                modes=["fwdbwd"],
                impls=ALL_IMPLS,
            )
        return dict(
            B=1,
            H=4,
            D=64,
            causal=True,
            ws=[2048, 4096, 8192, 16384, 32768],
            rs=[1, 2, 4, 8, 16],
            Ns=[4096 * 2**i for i in range(9)],
            ref_n=16384,
            modes=["fwdbwd"],
            impls=ALL_IMPLS,
        )
    if case == "target1":
        n, h, d = (4096, 2, 32) if quick else (65536, 8, 64)
        ws = [256, 512, 1024] if quick else [2048, 4096, 8192]
        return dict(
            B=1,
            H=h,
            D=d,
            causal=True,
            ws=ws,
            rs=[1, 2, 4],
            Ns=[n],
            modes=list(MODES),
            impls=target_impls,
        )
    if case == "target2":
        n, h, d = (4096, 2, 32) if quick else (65536, 8, 64)
        return dict(
            B=1,
            H=h,
            D=d,
            causal=True,
            ws=[64, 128, 256, 512],
            rs=[1, 2, 4, 8],
            Ns=[n],
            modes=list(MODES),
            impls=target_impls,
        )
    if case == "gflops":
        if quick:
            return dict(
                B=1, H=2, D=32, causal=False, seg=[512], n_tokens=2048, mm_n=512, modes=list(MODES)
            )
        return dict(
            B=1,
            H=8,
            D=64,
            causal=False,
            seg=[128, 256, 512, 1024, 2048, 4096],
            n_tokens=16384,
            mm_n=2048,
            modes=list(MODES),
        )
    if case == "engines":
        # (label, ws, rs): long segments (w/r up to 2048), short segments, one dense pattern
        if quick:
            return dict(
                B=1,
                H=2,
                D=32,
                causal=True,
                N=4096,
                modes=list(MODES),
                impls=ENGINE_IMPLS,
                problems=[
                    ("long_w", [256, 512, 1024], [1, 2, 4]),
                    ("short_w", [64, 128, 256, 512], [1, 2, 4, 8]),
                ],
            )
        return dict(
            B=1,
            H=8,
            D=64,
            causal=True,
            N=16384,
            modes=list(MODES),
            impls=ENGINE_IMPLS,
            problems=[
                ("long_w", [2048, 4096, 8192], [1, 2, 4]),
                ("short_w", [64, 128, 256, 512], [1, 2, 4, 8]),
                ("one_pattern", [2048], [1]),
            ],
        )
    if case == "peak":
        if quick:
            return dict(
                B=1,
                H=2,
                D=32,
                causal=True,
                ws=[256, 512, 1024],
                rs=[1, 2, 4],
                N=4096,
                sdpa_n=1024,
                gemm_n=256,
                dtypes=["float32", "bfloat16"],
                modes=list(MODES),
            )
        # dense causal SDPA at N = 16K needs 1.14x the FLOPs of the target1 shape
        return dict(
            B=1,
            H=8,
            D=64,
            causal=True,
            ws=[2048, 4096, 8192],
            rs=[1, 2, 4],
            N=65536,
            sdpa_n=16384,
            gemm_n=2048,
            dtypes=["float32", "bfloat16"],
            modes=list(MODES),
        )
    raise ValueError(f"--case must be one of {CASES + ('all',)}, got {case!r}")


def bytes_estimate(impl: str, spec: dict[str, object]) -> float:
    """Rough peak bytes of one measurement, to skip what cannot fit in memory."""
    if impl in ("mm", "gemm"):
        return 3 * 4 * spec["n"] ** 2
    t = 4.0 * spec["B"] * spec["N"] * spec["H"] * spec["D"]
    bwd = spec["mode"] == "fwdbwd"
    if impl == "gather_sdpa":
        m = len(spec["ws"])
        return (8 + 4 * m) * t if bwd else (4 + 3 * m) * t
    return 8 * t if bwd else 4 * t


# -------------------------------------------------------------------------- worker


def _impl_fn(spec: dict[str, object]):
    """The callable ``(q, k, v) -> out`` of one implementation."""
    import torch.nn.functional as F

    impl, causal = spec["impl"], bool(spec["causal"])
    if impl == "longnet":
        import longnet

        return lambda q, k, v: longnet.dilated_attention(
            q, k, v, spec["ws"], spec["rs"], is_causal=causal
        )
    if impl.startswith("longnet_"):
        import longnet

        engine = impl[len("longnet_") :]

        def on_engine(q, k, v):
            with longnet.use_engine(engine):
                out = longnet.dilated_attention(q, k, v, spec["ws"], spec["rs"], is_causal=causal)
            assert longnet.last_engine() == engine, longnet.last_engine()
            return out

        return on_engine
    if impl == "gather_sdpa":
        from benchmarks.gather_sdpa import gather_sdpa_dilated_attention

        return lambda q, k, v: gather_sdpa_dilated_attention(
            q, k, v, spec["ws"], spec["rs"], is_causal=causal
        )
    if impl == "dense_sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=causal,
        ).transpose(1, 2)
    if impl == "segment_sdpa":
        w = spec["ws"][0]

        def segments(q, k, v):
            b, n, h, d = q.shape
            split = lambda t: t.reshape(b * n // w, w, h, d).transpose(1, 2)  # noqa: E731
            out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=causal)
            return out.transpose(1, 2).reshape(b, n, h, d)

        return segments
    raise ValueError(f"unknown implementation {impl!r}")


def _attention_call(spec: dict[str, object], n: int, gen):
    """A no-argument callable running one forward (and backward) on fresh inputs."""
    import torch

    bsz, h, d = (int(spec[x]) for x in ("B", "H", "D"))
    hk = int(spec.get("Hk", h))
    grad = spec["mode"] == "fwdbwd"
    dtype = getattr(torch, spec.get("dtype", "float32"))
    q = torch.randn(bsz, n, h, d, generator=gen).to(dtype).requires_grad_(grad)
    k = torch.randn(bsz, n, hk, d, generator=gen).to(dtype).requires_grad_(grad)
    v = torch.randn(bsz, n, hk, d, generator=gen).to(dtype).requires_grad_(grad)
    gout = torch.randn(bsz, n, h, d, generator=gen).to(dtype) if grad else None
    fn = _impl_fn(spec)

    def call() -> None:
        if grad:
            fn(q, k, v).backward(gout)
            q.grad = k.grad = v.grad = None
        else:
            with torch.no_grad():
                fn(q, k, v)

    return call


def run_worker(spec: dict[str, object]) -> dict[str, object]:
    """One measurement, in this process.

    A call on tiny inputs first starts thread pools and lazy library state; then the
    real inputs are built, the peak-RSS mark is reset and one cold call gives the peak
    memory; then timed repeats.
    """
    import torch

    torch.set_num_threads(int(spec["threads"]))
    gen = torch.Generator().manual_seed(0)
    if spec["impl"] == "mm":

        def mm_call(n):
            a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
            c = torch.empty(n, n)
            return lambda: torch.mm(a, b, out=c)

        mm_call(64)()
        call = mm_call(int(spec["n"]))
    elif spec["impl"] == "gemm":

        def gemm_call(n):
            a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
            if spec["gemm"] == "onednn_float32":
                am, bm = a.to_mkldnn(), b.to_mkldnn()
                return lambda: torch._C._nn.mkldnn_linear(am, bm)
            if spec["gemm"] == "onednn_bfloat16":
                a, b = a.bfloat16(), b.bfloat16()
            c = torch.empty(n, n, dtype=a.dtype)
            return lambda: torch.mm(a, b, out=c)

        gemm_call(64)()
        call = gemm_call(int(spec["n"]))
    else:
        tiny = spec["ws"][0] if spec["impl"] == "segment_sdpa" else 256
        _attention_call(spec, min(tiny, int(spec["N"])), gen)()
        call = _attention_call(spec, int(spec["N"]), gen)

    probe = PeakRSS()
    probe.start()
    t0 = time.perf_counter()
    call()
    cold = time.perf_counter() - t0
    peak = probe.stop()
    # A large-GEMM reference is the limit the kernels are held against: a product of
    # well under a second, so many repeats and the best of them (the median of two
    # swung 2x here). Everything else keeps the median of --repeats.
    is_gemm = spec["impl"] == "gemm"
    repeats = max(GEMM_REPEATS, int(spec["repeats"])) if is_gemm else int(spec["repeats"])
    times = time_calls(call, repeats, float(spec["budget"]), cold)
    rec = {
        "cold_s": cold,
        "times_s": times,
        "time_s": min(times) if is_gemm else median(times),
        "timing": "best" if is_gemm else "median",
        "peak_bytes": peak,
        "memory_method": probe.method,
    }
    if spec["impl"] == "longnet":
        rec["products_used"] = torch.ops.longnet._cpu_products()
        rec["bf16_row_pass"] = torch.ops.longnet._cpu_bf16_row_pass()
    return rec


# ------------------------------------------------------------------- orchestration


class Runner:
    """Runs measurements in subprocesses, prints progress, keeps the records."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.longnet_reason = _longnet_unavailable()

    def skip_reason(self, impl: str, spec: dict[str, object]) -> str | None:
        a = self.args
        if impl.startswith("longnet") and self.longnet_reason:
            return self.longnet_reason
        if impl == "gather_sdpa" and spec["N"] > a.baseline_max_n:
            return f"N > --baseline-max-n {a.baseline_max_n}"
        if impl == "dense_sdpa" and spec["N"] > a.dense_max_n:
            return f"N > --dense-max-n {a.dense_max_n}"
        avail = mem_available_bytes()
        need = bytes_estimate(impl, spec)
        if avail is not None and need > 0.7 * avail:
            return f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
        return None

    def measure(self, impl: str, spec: dict[str, object]) -> dict[str, object]:
        """Run one measurement (or record why it was skipped) and print a progress line."""
        a = self.args
        spec = dict(spec, impl=impl, threads=a.threads, repeats=a.repeats, budget=a.budget)
        label = (
            f"{spec.get('case', '')}: {impl:12s} {spec.get('problem', '')} "
            + (
                f"{spec.get('gemm', '')} n={spec['n']}"
                if impl in ("mm", "gemm")
                else f"N={spec['N']:>8d} {spec['mode']:6s}"
            )
            + (f" {spec['dtype']}" if "dtype" in spec else "")
            + (f" products={spec['products']}" if "products" in spec else "")
        )
        reason = self.skip_reason(impl, spec)
        if reason:
            print(f"  {label}  skipped ({reason})", flush=True)
            return dict(spec, skipped=reason)
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
        if spec.get("products") == "blas":
            env["LONGNET_CPU_BRGEMM"] = "0"
        if spec.get("products") == "portable_rows":
            env["LONGNET_CPU_AVX512"] = "0"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
        t0 = time.time()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=a.timeout, env=env, cwd=ROOT
            )
        except subprocess.TimeoutExpired:
            print(f"  {label}  timed out after {a.timeout:.0f} s", flush=True)
            return dict(spec, skipped=f"timed out after {a.timeout:.0f} s")
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"  {label}  failed (exit {proc.returncode}): {err}", flush=True)
            return dict(spec, skipped=f"failed: {err}")
        rec = dict(spec, **json.loads(lines[-1][len("RESULT ") :]))
        if impl in ("mm", "gemm"):
            rec["gflops"] = 2.0 * spec["n"] ** 3 / rec["time_s"] / 1e9
        else:
            rec["gflops"] = rec["flops"] / rec["time_s"] / 1e9
        print(
            f"  {label}  {rec['time_s']:9.4f} s  {rec['gflops']:8.1f} GFLOP/s  "
            f"peak +{rec.get('peak_bytes', 0) / 2**20:9.1f} MiB  "
            f"({time.time() - t0:.1f} s)",
            flush=True,
        )
        return rec


def _longnet_unavailable() -> str | None:
    """Why ``longnet`` cannot be timed on CPU here, or None when it can."""
    try:
        import torch

        import longnet  # noqa: F401
    except ImportError as exc:
        return f"longnet not importable: {exc}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("longnet::dilated_attention_fwd", "CPU"):
        return "longnet has no CPU kernel in this build"
    return None


def _spec(case: str, cfg: dict[str, object], n: int, mode: str, ws, rs) -> dict[str, object]:
    return dict(
        case=case,
        B=cfg["B"],
        N=n,
        H=cfg["H"],
        Hk=cfg["H"],
        D=cfg["D"],
        causal=cfg["causal"],
        ws=list(ws),
        rs=list(rs),
        mode=mode,
    )


def _flops(spec: dict[str, object], impl: str) -> float:
    bwd = spec["mode"] == "fwdbwd"
    if impl == "dense_sdpa":
        return dense_flops(spec["N"], spec["H"], spec["D"], spec["causal"], spec["B"], bwd)
    return pattern_flops(
        spec["N"], spec["H"], spec["D"], spec["ws"], spec["rs"], spec["causal"], spec["B"], bwd
    )


def run_case(case: str, runner: Runner) -> dict[str, object]:
    """Measure every implementation of one case; returns the records and a summary."""
    cfg = case_configs(case, runner.args.quick)
    cfg["modes"] = [m for m in cfg["modes"] if m in runner.args.modes]
    if "Ns" in cfg:
        cfg["Ns"] = [n for n in cfg["Ns"] if n <= runner.args.max_n] or cfg["Ns"][:1]
    print(f"\n## {case}: {json.dumps({k: v for k, v in cfg.items()})}", flush=True)
    load_before = os.getloadavg()
    records: list[dict[str, object]] = []
    if case == "peak":
        for g in GEMMS:
            records.append(
                runner.measure("gemm", dict(case=case, gemm=g, n=cfg["gemm_n"], flops=0.0))
            )
        for dtype in cfg["dtypes"]:
            for mode in cfg["modes"]:
                spec = dict(_spec(case, cfg, cfg["N"], mode, cfg["ws"], cfg["rs"]), dtype=dtype)
                # old and new products measured one after the other, for each shape
                variants = ("blas", "brgemm") + (("portable_rows",) if dtype == "bfloat16" else ())
                for products in variants:
                    records.append(
                        runner.measure(
                            "longnet", dict(spec, products=products, flops=_flops(spec, "longnet"))
                        )
                    )
                sd = dict(spec, N=cfg["sdpa_n"])
                records.append(
                    runner.measure("dense_sdpa", dict(sd, flops=_flops(sd, "dense_sdpa")))
                )
    elif case == "gflops":
        records.append(runner.measure("mm", dict(case=case, n=cfg["mm_n"], flops=0.0)))
        for w in cfg["seg"]:
            n = max(cfg["n_tokens"], w)
            for mode in cfg["modes"]:
                spec = _spec(case, cfg, n, mode, [w], [1])
                for impl in ("longnet", "segment_sdpa"):
                    records.append(runner.measure(impl, dict(spec, flops=_flops(spec, impl))))
    elif case == "engines":
        for label, ws, rs in cfg["problems"]:
            for mode in cfg["modes"]:
                spec = dict(_spec(case, cfg, cfg["N"], mode, ws, rs), problem=label)
                for impl in cfg["impls"]:
                    records.append(runner.measure(impl, dict(spec, flops=_flops(spec, impl))))
    else:
        for n in cfg["Ns"]:
            for mode in cfg["modes"]:
                spec = _spec(case, cfg, n, mode, cfg["ws"], cfg["rs"])
                for impl in cfg["impls"]:
                    records.append(runner.measure(impl, dict(spec, flops=_flops(spec, impl))))
    return {
        "case": case,
        "quick": runner.args.quick,
        "config": cfg,
        "machine": machine_info(runner.args.threads),
        "records": records,
        "loadavg": {"before": load_before, "after": os.getloadavg()},
    }


# ------------------------------------------------------------------------ reporting


def _find(records, impl, mode=None, n=None, w=None):
    for r in records:
        if r.get("impl") != impl or "time_s" not in r:
            continue
        if mode is not None and r.get("mode") != mode:
            continue
        if n is not None and r.get("N") != n:
            continue
        if w is not None and r.get("ws") != [w]:
            continue
        return r
    return None


def _mib(rec) -> str:
    return f"{rec['peak_bytes'] / 2**20:.1f}" if "peak_bytes" in rec else "-"


def summarize(result: dict[str, object]) -> str:
    """Markdown table and target lines of one case; also stores ``result['summary']``."""
    case, recs, cfg = result["case"], result["records"], result["config"]
    rows, summary, lines = [], {}, []
    for r in recs:
        if r["impl"] in ("mm", "gemm"):
            continue
        shape = (
            f"N={r['N']}"
            + (f" w={r['ws'][0]}" if case == "gflops" else "")
            + (f" {r['problem']}" if case == "engines" else "")
            + (f" {r['dtype']} {r.get('products', '')}" if case == "peak" else "")
        )
        if "time_s" in r:
            rows.append(
                [
                    r["impl"],
                    shape,
                    r["mode"],
                    f"{r['time_s']:.4f}",
                    f"{1e6 * r['time_s'] / (r['B'] * r['N']):.2f}",
                    f"{r['gflops']:.1f}",
                    _mib(r),
                    "",
                ]
            )
        else:
            rows.append([r["impl"], shape, r["mode"], "-", "-", "-", "-", r["skipped"]])
    headers = ["impl", "shape", "mode", "time (s)", "us/token", "GFLOP/s", "peak MiB", "note"]
    lines.append(markdown_table(headers, rows))

    if case == "scaling":
        ref = _find(recs, "longnet", "fwdbwd", cfg["ref_n"])
        if ref:
            per_tok = {}
            for n in cfg["Ns"]:
                r = _find(recs, "longnet", "fwdbwd", n)
                if r:
                    per_tok[n] = r["time_s"] / n
            big = [per_tok[n] / per_tok[cfg["ref_n"]] for n in per_tok if n >= cfg["ref_n"]]
            summary["time_per_token_ratio_to_ref"] = {
                str(n): per_tok[n] / per_tok[cfg["ref_n"]] for n in per_tok
            }
            lines.append(
                f"\nlongnet fwd+bwd time/token relative to N={cfg['ref_n']}: "
                + ", ".join(f"{n}: {per_tok[n] / per_tok[cfg['ref_n']]:.2f}" for n in per_tok)
            )
            lines.append(f"max ratio for N >= {cfg['ref_n']}: {max(big):.2f} (flat means ~1)")
    elif case in ("target1", "target2"):
        n = cfg["Ns"][0]
        for mode in cfg["modes"]:
            ln, gs = _find(recs, "longnet", mode, n), _find(recs, "gather_sdpa", mode, n)
            if ln and gs:
                speed = gs["time_s"] / ln["time_s"]
                mem = ln["peak_bytes"] / max(gs["peak_bytes"], 1)
                summary[f"speedup_{mode}"] = speed
                summary[f"memory_ratio_{mode}"] = mem
                lines.append(
                    f"\n{mode}: speedup (gather_sdpa time / longnet time) {speed:.2f}x; "
                    f"peak memory longnet / gather_sdpa {mem:.2f}x"
                )
        need = 1.3 if case == "target1" else 2.0
        if "speedup_fwdbwd" in summary:
            ok = summary["speedup_fwdbwd"] >= need
            lines.append(
                f"target fwd+bwd speedup >= {need}x: "
                f"{'PASS' if ok else 'FAIL'} ({summary['speedup_fwdbwd']:.2f}x)"
            )
        if case == "target2" and "speedup_fwd" in summary:
            ok = summary["speedup_fwd"] >= need
            lines.append(
                f"target fwd speedup >= {need}x: "
                f"{'PASS' if ok else 'FAIL'} ({summary['speedup_fwd']:.2f}x)"
            )
        if case == "target1" and "memory_ratio_fwdbwd" in summary:
            ok = summary["memory_ratio_fwdbwd"] <= 0.5
            lines.append(
                f"target fwd+bwd peak memory <= 0.5x: "
                f"{'PASS' if ok else 'FAIL'} ({summary['memory_ratio_fwdbwd']:.2f}x)"
            )
    elif case == "gflops":
        mm = _find(recs, "mm")
        if mm:
            summary["mm_gflops"] = mm["gflops"]
            lines.append(f"\ntorch.mm {mm['n']}x{mm['n']} float32: {mm['gflops']:.1f} GFLOP/s")
        rows = []
        for w in cfg["seg"]:
            for mode in cfg["modes"]:
                ln, sd = _find(recs, "longnet", mode, w=w), _find(recs, "segment_sdpa", mode, w=w)
                if not ln:
                    continue
                vs_sdpa = ln["gflops"] / sd["gflops"] if sd else float("nan")
                vs_mm = ln["gflops"] / mm["gflops"] if mm else float("nan")
                summary[f"w{w}_{mode}"] = {"vs_segment_sdpa": vs_sdpa, "vs_mm": vs_mm}
                mm_ok = "n/a (w < 512)" if w < 512 else ("PASS" if vs_mm >= 0.5 else "FAIL")
                rows.append(
                    [
                        w,
                        mode,
                        f"{ln['gflops']:.1f}",
                        f"{vs_sdpa:.2f}",
                        "PASS" if vs_sdpa >= 0.8 else "FAIL",
                        f"{vs_mm:.2f}",
                        mm_ok,
                    ]
                )
        if rows:
            lines.append(
                "\n"
                + markdown_table(
                    [
                        "w",
                        "mode",
                        "longnet GFLOP/s",
                        "vs segment SDPA",
                        ">= 0.8",
                        "vs torch.mm",
                        ">= 0.5",
                    ],
                    rows,
                )
            )
    elif case == "peak":
        lines.append("\n" + _peak_table(recs, cfg, summary))
        if "loadavg" in result:
            before, after = (
                ", ".join(f"{x:.1f}" for x in result["loadavg"][k]) for k in ("before", "after")
            )
            lines.append(f"load average (1, 5, 15 min) before {before}, after {after}")
    elif case == "engines":
        rows = []
        for label, ws, rs in cfg["problems"]:
            for mode in cfg["modes"]:
                got = {
                    r["impl"]: r
                    for r in recs
                    if r.get("problem") == label and r.get("mode") == mode and "time_s" in r
                }
                if not got:
                    continue
                winner = min(got, key=lambda i: got[i]["time_s"])
                fused = got.get("longnet")
                summary[f"{label}_{mode}"] = {i: got[i]["time_s"] for i in got}
                rows.append(
                    [label, f"w={ws} r={rs}", mode]
                    + [f"{got[i]['time_s']:.4f}" if i in got else "-" for i in cfg["impls"]]
                    + [
                        winner,
                        ", ".join(
                            f"{got[i]['time_s'] / fused['time_s']:.2f}x"
                            for i in cfg["impls"][1:]
                            if i in got
                        )
                        if fused
                        else "-",
                    ]
                )
        if rows:
            lines.append(
                "\n"
                + markdown_table(
                    ["problem", "patterns", "mode"]
                    + [f"{i} (s)" for i in cfg["impls"]]
                    + ["fastest", "time vs fused (cpu_flash, math)"],
                    rows,
                )
            )
    result["summary"] = summary
    return "\n".join(lines)


def _peak_find(recs, impl, dtype, mode, products=None):
    for r in recs:
        if (
            r.get("impl") == impl
            and r.get("dtype") == dtype
            and r.get("mode") == mode
            and "time_s" in r
            and (products is None or r.get("products") == products)
        ):
            return r
    return None


def _peak_table(recs, cfg, summary) -> str:
    """The peak case's table (GFLOP/s and ratios) and its target lines."""
    gemm = {r["gemm"]: r["gflops"] for r in recs if r.get("impl") == "gemm" and "gflops" in r}
    summary["gemm_gflops"] = gemm
    out = [
        f"large GEMM ({cfg['gemm_n']}^3): "
        + ", ".join(f"{g} {gemm[g]:.1f} GFLOP/s" for g in GEMMS if g in gemm),
        "",
    ]
    rows = []
    for dtype in cfg["dtypes"]:
        limit = gemm.get(f"onednn_{dtype}")
        for mode in cfg["modes"]:
            old = _peak_find(recs, "longnet", dtype, mode, "blas")
            new = _peak_find(recs, "longnet", dtype, mode, "brgemm")
            sd = _peak_find(recs, "dense_sdpa", dtype, mode)
            rows_portable = _peak_find(recs, "longnet", dtype, mode, "portable_rows")
            if not new:
                continue
            ent = {
                "new_gflops": new["gflops"],
                "new_time_s": new["time_s"],
                "new_peak_mib": new["peak_bytes"] / 2**20,
                "products_used": new.get("products_used"),
            }
            if old:
                ent.update(
                    old_gflops=old["gflops"],
                    old_time_s=old["time_s"],
                    old_peak_mib=old["peak_bytes"] / 2**20,
                    speedup=old["time_s"] / new["time_s"],
                )
            if rows_portable:
                ent.update(
                    portable_rows_gflops=rows_portable["gflops"],
                    row_pass_speedup=rows_portable["time_s"] / new["time_s"],
                    row_pass=new.get("bf16_row_pass"),
                )
            if sd:
                ent.update(sdpa_gflops=sd["gflops"], vs_sdpa=new["gflops"] / sd["gflops"])
            if limit:
                ent.update(gemm_gflops=limit, vs_gemm=new["gflops"] / limit)
            summary[f"{dtype}_{mode}"] = ent

            def f(key: str, fmt: str, ent: dict = ent) -> str:
                return fmt % ent[key] if key in ent else "-"

            rows.append(
                [
                    dtype,
                    mode,
                    f("old_gflops", "%.1f"),
                    f("new_gflops", "%.1f"),
                    f("speedup", "%.2fx"),
                    f("portable_rows_gflops", "%.1f"),
                    f("row_pass_speedup", "%.2fx"),
                    f("sdpa_gflops", "%.1f"),
                    f("vs_sdpa", "%.2fx"),
                    f("gemm_gflops", "%.1f"),
                    f("vs_gemm", "%.2f"),
                    f("old_peak_mib", "%.0f"),
                    f("new_peak_mib", "%.0f"),
                    ent.get("products_used") or "-",
                ]
            )
    out.append(
        markdown_table(
            [
                "dtype",
                "mode",
                "blas GFLOP/s",
                "brgemm GFLOP/s",
                "speedup",
                "portable rows GFLOP/s",
                "row pass gain",
                "SDPA GFLOP/s",
                "vs SDPA",
                "oneDNN GEMM",
                "vs GEMM",
                "blas MiB",
                "brgemm MiB",
                "products",
            ],
            rows,
        )
    )

    def target(name, value, need):
        if value is None:
            return
        ok = value >= need
        summary.setdefault("targets", {})[name] = {"value": value, "need": need, "pass": ok}
        out.append(f"target {name} >= {need}: {'PASS' if ok else 'FAIL'} ({value:.2f})")

    g = lambda dt, md, key: summary.get(f"{dt}_{md}", {}).get(key)  # noqa: E731
    out.append("")
    target("float32 fwd+bwd speedup over blas", g("float32", "fwdbwd", "speedup"), 2.0)
    t32, t16 = g("float32", "fwdbwd", "new_time_s"), g("bfloat16", "fwdbwd", "new_time_s")
    target("bfloat16 fwd+bwd speed / float32", t32 / t16 if t32 and t16 else None, 2.0)
    for dt in cfg["dtypes"]:
        target(f"{dt} fwd+bwd GFLOP/s vs SDPA", g(dt, "fwdbwd", "vs_sdpa"), 1.5)
    target("float32 fwd vs oneDNN GEMM", g("float32", "fwd", "vs_gemm"), 0.5)
    target("bfloat16 fwd vs oneDNN GEMM", g("bfloat16", "fwd", "vs_gemm"), 0.35)
    return "\n".join(out)


def _plot_peak(result, path, plt) -> None:
    recs, cfg = result["records"], result["config"]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    groups = [(dt, md) for dt in cfg["dtypes"] for md in cfg["modes"]]
    series = [
        ("longnet blas products", "longnet", "blas"),
        ("longnet brgemm products", "longnet", "brgemm"),
        ("longnet brgemm, portable bf16 rows", "longnet", "portable_rows"),
        ("dense causal SDPA", "dense_sdpa", None),
    ]
    width = 0.8 / len(series)
    for i, (label, impl, products) in enumerate(series):
        ys = [
            (_peak_find(recs, impl, dt, md, products) or {}).get("gflops", 0.0) for dt, md in groups
        ]
        ax.bar([j + i * width for j in range(len(groups))], ys, width, label=label)
    colors = {"mkl_float32": "tab:gray", "onednn_float32": "k", "onednn_bfloat16": "tab:red"}
    for r in recs:
        if r.get("impl") == "gemm" and "gflops" in r:
            ax.axhline(
                r["gflops"], ls="--", color=colors[r["gemm"]], label=f"GEMM {r['gemm']} {r['n']}^3"
            )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{dt}\n{md}" for dt, md in groups])
    ax.set_ylabel("GFLOP/s (needed FLOPs)")
    ax.set_title(f"N={cfg['N']} H={cfg['H']} D={cfg['D']} w={cfg['ws']} r={cfg['rs']} causal")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def plot(result: dict[str, object], path: str) -> bool:
    """Save a PNG of one case; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    case, recs, cfg = result["case"], result["records"], result["config"]
    if case == "engines":
        return False  # the table is the result
    if case == "peak":
        _plot_peak(result, path, plt)
        plt.gcf().suptitle(f"longnet CPU benchmark: peak ({result['machine']['threads']} threads)")
        plt.gcf().tight_layout()
        plt.gcf().savefig(path, dpi=110)
        plt.close(plt.gcf())
        return True
    impls = [
        i
        for i in ("longnet", "gather_sdpa", "dense_sdpa", "segment_sdpa")
        if any(r["impl"] == i and "time_s" in r for r in recs)
    ]
    if case == "scaling":
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for impl in impls:
            pts = [
                (r["N"], r["time_s"], r["peak_bytes"])
                for r in recs
                if r["impl"] == impl and "time_s" in r
            ]
            ns, ts, ms = zip(*pts)
            axes[0].loglog(ns, ts, "o-", label=impl)
            axes[1].semilogx(ns, [1e6 * t / n for n, t in zip(ns, ts)], "o-", label=impl)
            axes[2].loglog(ns, [m / 2**20 for m in ms], "o-", label=impl)
        for ax, title in zip(
            axes, ("fwd+bwd time (s)", "fwd+bwd time per token (us)", "peak RSS increase (MiB)")
        ):
            ax.set_xlabel("sequence length N")
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    elif case in ("target1", "target2"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        width = 0.8 / max(len(impls), 1)
        for i, impl in enumerate(impls):
            t = [(_find(recs, impl, m) or {}).get("time_s", 0.0) for m in cfg["modes"]]
            mem = [(_find(recs, impl, m) or {}).get("peak_bytes", 0) / 2**20 for m in cfg["modes"]]
            xs = [j + i * width for j in range(len(cfg["modes"]))]
            axes[0].bar(xs, t, width, label=impl)
            axes[1].bar(xs, mem, width, label=impl)
        for ax, title in zip(axes, ("time (s)", "peak RSS increase (MiB)")):
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cfg["modes"]))])
            ax.set_xticklabels(cfg["modes"])
            ax.set_title(f"{case} N={cfg['Ns'][0]}: {title}")
            ax.legend()
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for impl in impls:
            for mode in cfg["modes"]:
                pts = [(w, _find(recs, impl, mode, w=w)) for w in cfg["seg"]]
                pts = [(w, r["gflops"]) for w, r in pts if r]
                if pts:
                    ax.semilogx(*zip(*pts), "o-", label=f"{impl} {mode}", base=2)
        mm = _find(recs, "mm")
        if mm:
            ax.axhline(mm["gflops"], color="k", ls="--", label=f"torch.mm {mm['n']}")
        ax.set_xlabel("segment length w (r = 1)")
        ax.set_ylabel("GFLOP/s")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"longnet CPU benchmark: {case} ({result['machine']['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------ CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--case", default="all", choices=CASES + ("all",))
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    p.add_argument(
        "--out",
        default=os.path.join(ROOT, "benchmarks", "results"),
        help="folder for the JSON results and PNG plots",
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up")
    p.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="seconds of timed calls per measurement before repeats are cut",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    p.add_argument(
        "--dense-max-n",
        type=int,
        default=16384,
        help="largest N for dense SDPA on the whole sequence",
    )
    p.add_argument("--baseline-max-n", type=int, default=262144, help="largest N for gather_sdpa")
    p.add_argument(
        "--max-n", type=int, default=1 << 20, help="largest N of the scaling case (default 1048576)"
    )
    p.add_argument(
        "--modes",
        default="fwd,fwdbwd",
        help="comma-separated subset of fwd,fwdbwd to run (default both)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        raise SystemExit(f"--modes must list some of {MODES}, got {args.modes}")
    os.makedirs(args.out, exist_ok=True)
    runner = Runner(args)
    if runner.longnet_reason:
        print(f"note: {runner.longnet_reason}; longnet rows are skipped", flush=True)
    prefix = "cpu_quick_" if args.quick else "cpu_"
    for case in CASES if args.case == "all" else (args.case,):
        result = run_case(case, runner)
        text = summarize(result)
        print(f"\n### {case}\n\n{text}\n", flush=True)
        base = os.path.join(args.out, prefix + case)
        with open(base + ".json", "w") as f:
            json.dump(result, f, indent=1)
        saved = [base + ".json"] + ([base + ".png"] if plot(result, base + ".png") else [])
        print("saved " + ", ".join(os.path.relpath(s) for s in saved), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
