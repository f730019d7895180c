#!/usr/bin/env python3
"""Peak memory and speed of one-process LongNetLM training steps as the sequence
grows, with and without activation checkpointing and sequence chunks, beside
``longnet.plan``'s prediction (``plan_training``) for the same run.

Modes (``--modes``): ``plain`` (nothing recomputed), ``checkpointing``
(``set_activation_checkpointing``), ``checkpointing+chunks`` (also
``set_chunk_size(--chunk-size)`` and ``return_logits=False``: the feed-forward and the
LM head with the loss over sequence chunks, recomputed in backward).

Every (length, mode) point runs in a fresh process: one AdamW training step on one
sequence (batch 1), its peak resident memory (``ru_maxrss``) minus the resident
memory before the step (libraries, interpreter; parameters and AdamW state are added
back), and the step's tokens/s. A point is skipped, and the mode's search stops, when
the plan predicts more than ``--cap-gib``; a child whose resident memory passes the
cap is stopped (the machine is shared: the default cap is 12 GiB). The table ends
with the longest length each mode trained.

    python benchmarks/bench_train_memory.py                      # defaults below
    python benchmarks/bench_train_memory.py --lengths 4K,8K,16K --layers 4 --embed-dim 256
    python benchmarks/bench_train_memory.py --lengths 64K,256K,1M \
        --modes checkpointing+chunks --cap-gib 20 --out benchmarks/results/train_memory_cpu_1m

Writes benchmarks/results/train_memory_cpu.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results")
MODES = ("plain", "checkpointing", "checkpointing+chunks")


def _patterns(n: int):
    """w = 1024, 4096, ... up to n with w / r = 1024 keys per query and pattern."""
    ws, rs = [], []
    w, r = 1024, 1
    while w <= n:
        ws.append(w)
        rs.append(r)
        w, r = 4 * w, 4 * r
    return (ws, rs) if ws else ([n], [1])


def _config(args, n: int):
    from longnet.model import LongNetConfig

    ws, rs = _patterns(n)
    return LongNetConfig(
        num_layers=args.layers,
        embed_dim=args.embed_dim,
        num_heads=args.heads,
        segment_lengths=ws,
        dilation_rates=rs,
    )


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _watch_rss(cap_bytes: int) -> None:
    """Stop this process (exit 3) as soon as its resident memory passes the cap."""

    def watch() -> None:
        while True:
            if _rss_bytes() > cap_bytes:
                sys.stderr.write(f"resident memory passed the {cap_bytes / 2**30:g} GiB cap\n")
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def child(args) -> None:
    import torch

    from longnet.model import LongNetLM

    _watch_rss(int(args.cap_gib * 2**30))
    torch.set_num_threads(args.threads)
    n = args.child
    torch.manual_seed(0)
    model = LongNetLM(_config(args, n))
    model.set_activation_checkpointing(args.ac)
    chunked = args.chunk is not None
    model.set_chunk_size(args.chunk)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # Load the kernels and libraries a step touches with a 64-token step, so the
    # baseline holds them: ``base`` is then the process plus parameters and AdamW state
    # (which the plan's peak includes and the measurement adds back below).
    _, warm = model(
        torch.zeros(1, 64, dtype=torch.long),
        torch.zeros(1, 64, dtype=torch.long),
        return_logits=not chunked,
    )
    warm.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    del warm
    states = sum(p.numel() * p.element_size() for p in model.parameters()) * 3
    base = _rss_bytes() - states
    x = torch.randint(0, 256, (1, n))
    y = torch.randint(0, 256, (1, n))
    t0 = time.perf_counter()
    _, loss = model(x, y, return_logits=not chunked)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "base_bytes": base,
                "peak_rss_bytes": peak,
                "measured_bytes": peak - base,
                "step_s": step_s,
                "loss": float(loss),
            }
        )
    )


def parse_lengths(text: str) -> list[int]:
    from longnet.plan import parse_count

    return [parse_count(t) for t in text.split(",") if t]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--lengths",
        default="4K,8K,16K,32K,64K",
        help="sequence lengths to try, in order (comma-separated, K/M suffixes)",
    )
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated modes, from {', '.join(MODES)}",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=8192,
        help="positions per chunk of the checkpointing+chunks mode",
    )
    p.add_argument(
        "--cap-gib",
        type=float,
        default=12.0,
        help="skip lengths the plan predicts above this many GiB; stop a run whose resident memory passes it",
    )
    p.add_argument("--out", default=os.path.join(RESULTS, "train_memory_cpu"))
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ac", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}; choose from {', '.join(MODES)}")
    if args.chunk_size < 1:
        p.error(f"--chunk-size must be >= 1, got {args.chunk_size}")

    from tqdm import tqdm

    from longnet.plan import plan_training

    lengths = parse_lengths(args.lengths)
    rows: list[dict] = []
    stopped: dict[str, int | None] = {m: None for m in modes}
    todo = [(n, m) for m in modes for n in lengths]
    for n, mode in tqdm(todo, desc="points", unit="run"):
        ac = mode != "plain"
        chunk = args.chunk_size if mode == "checkpointing+chunks" else None
        cfg = _config(args, n)
        plan = plan_training(
            cfg,
            batch=1,
            seq_len=n,
            dtype="float32",
            activation_checkpointing=ac,
            chunk_size=chunk,
        )
        point = {
            "tokens": n,
            "mode": mode,
            "activation_checkpointing": ac,
            "chunk_size": chunk,
            "plan_peak_bytes": plan.peak_bytes,
        }
        if stopped[mode] is not None or plan.peak_bytes > args.cap_gib * 2**30:
            stopped[mode] = stopped[mode] or n
            rows.append({**point, "skipped": True})
            continue
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            str(n),
            "--layers",
            str(args.layers),
            "--embed-dim",
            str(args.embed_dim),
            "--heads",
            str(args.heads),
            "--threads",
            str(args.threads),
            "--cap-gib",
            str(args.cap_gib),
        ]
        cmd += (["--ac"] if ac else []) + (["--chunk", str(chunk)] if chunk else [])
        # A fixed mmap threshold: every large tensor gets its own mapping that goes back
        # to the system when freed, so the peak RSS is the peak of live tensors (glibc's
        # dynamic threshold would serve them from a heap that keeps freed memory).
        env = dict(
            os.environ,
            PYTHONPATH=ROOT,
            OMP_NUM_THREADS=str(args.threads),
            MALLOC_MMAP_THRESHOLD_="65536",
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            rows.append({**point, "failed": proc.stderr[-500:]})
            stopped[mode] = n
            continue
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(
            {
                **point,
                **got,
                "tokens_per_s": n / got["step_s"],
                "measured_over_plan": got["measured_bytes"] / plan.peak_bytes,
                "plan_activation_bytes": plan.activation_bytes,
            }
        )
    longest = {
        m: max((r["tokens"] for r in rows if r["mode"] == m and "measured_bytes" in r), default=0)
        for m in modes
    }
    print(
        f"{'tokens':>8} {'mode':>21} {'measured':>10} {'peak RSS':>10} {'plan':>10} "
        f"{'meas/plan':>9} {'step s':>8} {'tok/s':>8}"
    )
    for r in rows:
        if "measured_bytes" not in r:
            why = "failed" if "failed" in r else f"skipped (plan > {args.cap_gib:g} GiB)"
            print(
                f"{r['tokens']:>8} {r['mode']:>21} {'-':>10} {'-':>10} "
                f"{r['plan_peak_bytes'] / 2**30:>9.3g}G {why}"
            )
            continue
        print(
            f"{r['tokens']:>8} {r['mode']:>21} {r['measured_bytes'] / 2**30:>9.3g}G "
            f"{r['peak_rss_bytes'] / 2**30:>9.3g}G {r['plan_peak_bytes'] / 2**30:>9.3g}G "
            f"{r['measured_over_plan']:>9.3f} {r['step_s']:>8.1f} {r['tokens_per_s']:>8.0f}"
        )
    for m in modes:
        print(
            f"longest trained, {m}: "
            + (f"{longest[m]:,} tokens" if longest[m] else "none")
            + f" (cap {args.cap_gib:g} GiB)"
        )
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(
            {
                "command": "python benchmarks/bench_train_memory.py "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                "load_average": load,
                "layers": args.layers,
                "embed_dim": args.embed_dim,
                "heads": args.heads,
                "threads": args.threads,
                "cap_gib": args.cap_gib,
                "chunk_size": args.chunk_size,
                "longest_tokens": longest,
                "rows": rows,
            },
            f,
            indent=1,
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return 0
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, color in zip(MODES, ("C0", "C1", "C2")):
        pts = [r for r in rows if r["mode"] == mode]
        if not pts:
            continue
        done = [r for r in pts if "measured_bytes" in r]
        ax.plot(
            [r["tokens"] for r in pts],
            [r["plan_peak_bytes"] / 2**30 for r in pts],
            "--",
            color=color,
            label=f"plan, {mode}",
        )
        ax.plot(
            [r["tokens"] for r in done],
            [r["measured_bytes"] / 2**30 for r in done],
            "o-",
            color=color,
            label=f"measured, {mode}",
        )
        bx.plot(
            [r["tokens"] for r in done],
            [r["tokens_per_s"] for r in done],
            "o-",
            color=color,
            label=mode,
        )
    ax.axhline(args.cap_gib, color="grey", lw=0.8)
    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.set_xlabel("sequence length (tokens, batch 1)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax.set_yscale("log", base=2)
    ax.set_ylabel("peak memory above baseline (GiB)")
    bx.set_ylabel("training tokens / s")
    fig.suptitle(
        f"LongNetLM {args.layers} layers x {args.embed_dim}, one process, "
        f"{args.threads} threads (load {load[0]:.1f})"
        if load
        else "",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=110)
    print(f"saved {args.out}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
