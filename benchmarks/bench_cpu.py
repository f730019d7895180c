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

Cases (``--case``): ``scaling``, ``target1``, ``target2``, ``gflops``, ``engines`` or
``all``.
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
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import (  # noqa: E402
    PeakRSS,
    dense_flops,
    machine_info,
    markdown_table,
    mem_available_bytes,
    median,
    pattern_flops,
    time_calls,
)

CASES = ("scaling", "target1", "target2", "gflops", "engines")
MODES = ("fwd", "fwdbwd")
ALL_IMPLS = ("longnet", "gather_sdpa", "dense_sdpa")
ENGINE_IMPLS = ("longnet", "longnet_cpu_flash", "longnet_math")


# --------------------------------------------------------------------------- cases

def case_configs(case: str, quick: bool) -> Dict[str, object]:
    """Shapes and patterns of one case (tiny ones with ``quick``)."""
    # dense SDPA cannot run at the targets' full N; --quick leaves it out there too
    target_impls = ALL_IMPLS[:2] if quick else ALL_IMPLS
    if case == "scaling":
        if quick:
            return dict(B=1, H=2, D=32, causal=True, ws=[256, 512, 1024], rs=[1, 2, 4],
                        Ns=[2048, 4096], ref_n=2048, modes=["fwdbwd"], impls=ALL_IMPLS)
        return dict(B=1, H=4, D=64, causal=True, ws=[2048, 4096, 8192, 16384, 32768],
                    rs=[1, 2, 4, 8, 16], Ns=[4096 * 2 ** i for i in range(9)],
                    ref_n=16384, modes=["fwdbwd"], impls=ALL_IMPLS)
    if case == "target1":
        n, h, d = (4096, 2, 32) if quick else (65536, 8, 64)
        ws = [256, 512, 1024] if quick else [2048, 4096, 8192]
        return dict(B=1, H=h, D=d, causal=True, ws=ws, rs=[1, 2, 4], Ns=[n], modes=list(MODES),
                    impls=target_impls)
    if case == "target2":
        n, h, d = (4096, 2, 32) if quick else (65536, 8, 64)
        return dict(B=1, H=h, D=d, causal=True, ws=[64, 128, 256, 512], rs=[1, 2, 4, 8],
                    Ns=[n], modes=list(MODES), impls=target_impls)
    if case == "gflops":
        if quick:
            return dict(B=1, H=2, D=32, causal=False, seg=[512], n_tokens=2048,
                        mm_n=512, modes=list(MODES))
        return dict(B=1, H=8, D=64, causal=False, seg=[128, 256, 512, 1024, 2048, 4096],
                    n_tokens=16384, mm_n=2048, modes=list(MODES))
    if case == "engines":
        # (label, ws, rs): long segments (w/r up to 2048), short segments, one dense pattern
        if quick:
            return dict(B=1, H=2, D=32, causal=True, N=4096, modes=list(MODES),
                        impls=ENGINE_IMPLS,
                        problems=[("long_w", [256, 512, 1024], [1, 2, 4]),
                                  ("short_w", [64, 128, 256, 512], [1, 2, 4, 8])])
        return dict(B=1, H=8, D=64, causal=True, N=16384, modes=list(MODES), impls=ENGINE_IMPLS,
                    problems=[("long_w", [2048, 4096, 8192], [1, 2, 4]),
                              ("short_w", [64, 128, 256, 512], [1, 2, 4, 8]),
                              ("one_pattern", [2048], [1])])
    raise ValueError(f"--case must be one of {CASES + ('all',)}, got {case!r}")


def bytes_estimate(impl: str, spec: Dict[str, object]) -> float:
    """Rough peak bytes of one measurement, to skip what cannot fit in memory."""
    if impl == "mm":
        return 3 * 4 * spec["n"] ** 2
    t = 4.0 * spec["B"] * spec["N"] * spec["H"] * spec["D"]
    bwd = spec["mode"] == "fwdbwd"
    if impl == "gather_sdpa":
        m = len(spec["ws"])
        return (8 + 4 * m) * t if bwd else (4 + 3 * m) * t
    return 8 * t if bwd else 4 * t


# -------------------------------------------------------------------------- worker

def _impl_fn(spec: Dict[str, object]):
    """The callable ``(q, k, v) -> out`` of one implementation."""
    import torch.nn.functional as F

    impl, causal = spec["impl"], bool(spec["causal"])
    if impl == "longnet":
        import longnet

        return lambda q, k, v: longnet.dilated_attention(
            q, k, v, spec["ws"], spec["rs"], is_causal=causal)
    if impl.startswith("longnet_"):
        import longnet

        engine = impl[len("longnet_"):]

        def on_engine(q, k, v):
            with longnet.use_engine(engine):
                out = longnet.dilated_attention(q, k, v, spec["ws"], spec["rs"],
                                                is_causal=causal)
            assert longnet.last_engine() == engine, longnet.last_engine()
            return out

        return on_engine
    if impl == "gather_sdpa":
        from benchmarks.gather_sdpa import gather_sdpa_dilated_attention

        return lambda q, k, v: gather_sdpa_dilated_attention(
            q, k, v, spec["ws"], spec["rs"], is_causal=causal)
    if impl == "dense_sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
        ).transpose(1, 2)
    if impl == "segment_sdpa":
        w = spec["ws"][0]

        def segments(q, k, v):
            b, n, h, d = q.shape
            split = lambda t: t.reshape(b * n // w, w, h, d).transpose(1, 2)  # noqa: E731
            out = F.scaled_dot_product_attention(split(q), split(k), split(v),
                                                 is_causal=causal)
            return out.transpose(1, 2).reshape(b, n, h, d)

        return segments
    raise ValueError(f"unknown implementation {impl!r}")


def _attention_call(spec: Dict[str, object], n: int, gen):
    """A no-argument callable running one forward (and backward) on fresh inputs."""
    import torch

    bsz, h, d = (int(spec[x]) for x in ("B", "H", "D"))
    hk = int(spec.get("Hk", h))
    grad = spec["mode"] == "fwdbwd"
    q = torch.randn(bsz, n, h, d, generator=gen).requires_grad_(grad)
    k = torch.randn(bsz, n, hk, d, generator=gen).requires_grad_(grad)
    v = torch.randn(bsz, n, hk, d, generator=gen).requires_grad_(grad)
    gout = torch.randn(bsz, n, h, d, generator=gen) if grad else None
    fn = _impl_fn(spec)

    def call() -> None:
        if grad:
            fn(q, k, v).backward(gout)
            q.grad = k.grad = v.grad = None
        else:
            with torch.no_grad():
                fn(q, k, v)

    return call


def run_worker(spec: Dict[str, object]) -> Dict[str, object]:
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
    times = time_calls(call, int(spec["repeats"]), float(spec["budget"]), cold)
    return {"cold_s": cold, "times_s": times, "time_s": median(times),
            "peak_bytes": peak, "memory_method": probe.method}


# ------------------------------------------------------------------- orchestration

class Runner:
    """Runs measurements in subprocesses, prints progress, keeps the records."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.longnet_reason = _longnet_unavailable()

    def skip_reason(self, impl: str, spec: Dict[str, object]) -> Optional[str]:
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

    def measure(self, impl: str, spec: Dict[str, object]) -> Dict[str, object]:
        """Run one measurement (or record why it was skipped) and print a progress line."""
        a = self.args
        spec = dict(spec, impl=impl, threads=a.threads, repeats=a.repeats, budget=a.budget)
        label = (f"{spec.get('case', '')}: {impl:12s} {spec.get('problem', '')} "
                 + (f"n={spec['n']}" if impl == "mm" else f"N={spec['N']:>8d} {spec['mode']:6s}"))
        reason = self.skip_reason(impl, spec)
        if reason:
            print(f"  {label}  skipped ({reason})", flush=True)
            return dict(spec, skipped=reason)
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout,
                                  env=env, cwd=ROOT)
        except subprocess.TimeoutExpired:
            print(f"  {label}  timed out after {a.timeout:.0f} s", flush=True)
            return dict(spec, skipped=f"timed out after {a.timeout:.0f} s")
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"  {label}  failed (exit {proc.returncode}): {err}", flush=True)
            return dict(spec, skipped=f"failed: {err}")
        rec = dict(spec, **json.loads(lines[-1][len("RESULT "):]))
        if impl == "mm":
            rec["gflops"] = 2.0 * spec["n"] ** 3 / rec["time_s"] / 1e9
        else:
            rec["gflops"] = rec["flops"] / rec["time_s"] / 1e9
        print(f"  {label}  {rec['time_s']:9.4f} s  {rec['gflops']:8.1f} GFLOP/s  "
              f"peak +{rec.get('peak_bytes', 0) / 2**20:9.1f} MiB  "
              f"({time.time() - t0:.1f} s)", flush=True)
        return rec


def _longnet_unavailable() -> Optional[str]:
    """Why ``longnet`` cannot be timed on CPU here, or None when it can."""
    try:
        import torch
        import longnet  # noqa: F401
    except ImportError as exc:
        return f"longnet not importable: {exc}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("longnet::dilated_attention_fwd", "CPU"):
        return "longnet has no CPU kernel in this build"
    return None


def _spec(case: str, cfg: Dict[str, object], n: int, mode: str, ws, rs) -> Dict[str, object]:
    return dict(case=case, B=cfg["B"], N=n, H=cfg["H"], Hk=cfg["H"], D=cfg["D"],
                causal=cfg["causal"], ws=list(ws), rs=list(rs), mode=mode)


def _flops(spec: Dict[str, object], impl: str) -> float:
    bwd = spec["mode"] == "fwdbwd"
    if impl == "dense_sdpa":
        return dense_flops(spec["N"], spec["H"], spec["D"], spec["causal"], spec["B"], bwd)
    return pattern_flops(spec["N"], spec["H"], spec["D"], spec["ws"], spec["rs"],
                         spec["causal"], spec["B"], bwd)


def run_case(case: str, runner: Runner) -> Dict[str, object]:
    """Measure every implementation of one case; returns the records and a summary."""
    cfg = case_configs(case, runner.args.quick)
    cfg["modes"] = [m for m in cfg["modes"] if m in runner.args.modes]
    if "Ns" in cfg:
        cfg["Ns"] = [n for n in cfg["Ns"] if n <= runner.args.max_n] or cfg["Ns"][:1]
    print(f"\n## {case}: {json.dumps({k: v for k, v in cfg.items()})}", flush=True)
    records: List[Dict[str, object]] = []
    if case == "gflops":
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
    return {"case": case, "quick": runner.args.quick, "config": cfg,
            "machine": machine_info(runner.args.threads), "records": records}


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


def summarize(result: Dict[str, object]) -> str:
    """Markdown table and target lines of one case; also stores ``result['summary']``."""
    case, recs, cfg = result["case"], result["records"], result["config"]
    rows, summary, lines = [], {}, []
    for r in recs:
        if r["impl"] == "mm":
            continue
        shape = (f"N={r['N']}" + (f" w={r['ws'][0]}" if case == "gflops" else "")
                 + (f" {r['problem']}" if case == "engines" else ""))
        if "time_s" in r:
            rows.append([r["impl"], shape, r["mode"], f"{r['time_s']:.4f}",
                         f"{1e6 * r['time_s'] / (r['B'] * r['N']):.2f}",
                         f"{r['gflops']:.1f}", _mib(r), ""])
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
                str(n): per_tok[n] / per_tok[cfg["ref_n"]] for n in per_tok}
            lines.append(f"\nlongnet fwd+bwd time/token relative to N={cfg['ref_n']}: "
                         + ", ".join(f"{n}: {per_tok[n] / per_tok[cfg['ref_n']]:.2f}"
                                     for n in per_tok))
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
                lines.append(f"\n{mode}: speedup (gather_sdpa time / longnet time) {speed:.2f}x; "
                             f"peak memory longnet / gather_sdpa {mem:.2f}x")
        need = 1.3 if case == "target1" else 2.0
        if "speedup_fwdbwd" in summary:
            ok = summary["speedup_fwdbwd"] >= need
            lines.append(f"target fwd+bwd speedup >= {need}x: "
                         f"{'PASS' if ok else 'FAIL'} ({summary['speedup_fwdbwd']:.2f}x)")
        if case == "target2" and "speedup_fwd" in summary:
            ok = summary["speedup_fwd"] >= need
            lines.append(f"target fwd speedup >= {need}x: "
                         f"{'PASS' if ok else 'FAIL'} ({summary['speedup_fwd']:.2f}x)")
        if case == "target1" and "memory_ratio_fwdbwd" in summary:
            ok = summary["memory_ratio_fwdbwd"] <= 0.5
            lines.append(f"target fwd+bwd peak memory <= 0.5x: "
                         f"{'PASS' if ok else 'FAIL'} ({summary['memory_ratio_fwdbwd']:.2f}x)")
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
                rows.append([w, mode, f"{ln['gflops']:.1f}", f"{vs_sdpa:.2f}",
                             "PASS" if vs_sdpa >= 0.8 else "FAIL", f"{vs_mm:.2f}", mm_ok])
        if rows:
            lines.append("\n" + markdown_table(
                ["w", "mode", "longnet GFLOP/s", "vs segment SDPA", ">= 0.8",
                 "vs torch.mm", ">= 0.5"], rows))
    elif case == "engines":
        rows = []
        for label, ws, rs in cfg["problems"]:
            for mode in cfg["modes"]:
                got = {r["impl"]: r for r in recs if r.get("problem") == label
                       and r.get("mode") == mode and "time_s" in r}
                if not got:
                    continue
                winner = min(got, key=lambda i: got[i]["time_s"])
                fused = got.get("longnet")
                summary[f"{label}_{mode}"] = {i: got[i]["time_s"] for i in got}
                rows.append([label, f"w={ws} r={rs}", mode]
                            + [f"{got[i]['time_s']:.4f}" if i in got else "-"
                               for i in cfg["impls"]]
                            + [winner,
                               ", ".join(f"{got[i]['time_s'] / fused['time_s']:.2f}x"
                                         for i in cfg["impls"][1:] if i in got) if fused else "-"])
        if rows:
            lines.append("\n" + markdown_table(
                ["problem", "patterns", "mode"] + [f"{i} (s)" for i in cfg["impls"]]
                + ["fastest", "time vs fused (cpu_flash, math)"], rows))
    result["summary"] = summary
    return "\n".join(lines)


def plot(result: Dict[str, object], path: str) -> bool:
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
    impls = [i for i in ("longnet", "gather_sdpa", "dense_sdpa", "segment_sdpa")
             if any(r["impl"] == i and "time_s" in r for r in recs)]
    if case == "scaling":
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for impl in impls:
            pts = [(r["N"], r["time_s"], r["peak_bytes"]) for r in recs
                   if r["impl"] == impl and "time_s" in r]
            ns, ts, ms = zip(*pts)
            axes[0].loglog(ns, ts, "o-", label=impl)
            axes[1].semilogx(ns, [1e6 * t / n for n, t in zip(ns, ts)], "o-", label=impl)
            axes[2].loglog(ns, [m / 2**20 for m in ms], "o-", label=impl)
        for ax, title in zip(axes, ("fwd+bwd time (s)", "fwd+bwd time per token (us)",
                                    "peak RSS increase (MiB)")):
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="all", choices=CASES + ("all",))
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"),
                   help="folder for the JSON results and PNG plots")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up")
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds of timed calls per measurement before repeats are cut")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    p.add_argument("--dense-max-n", type=int, default=16384,
                   help="largest N for dense SDPA on the whole sequence")
    p.add_argument("--baseline-max-n", type=int, default=262144,
                   help="largest N for gather_sdpa")
    p.add_argument("--max-n", type=int, default=1 << 20,
                   help="largest N of the scaling case (default 1048576)")
    p.add_argument("--modes", default="fwd,fwdbwd",
                   help="comma-separated subset of fwd,fwdbwd to run (default both)")
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
