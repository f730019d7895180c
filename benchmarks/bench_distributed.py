"""Sequence-parallel dilated attention: per-rank cost as the sequence grows with the
number of ranks (LongNet Figure 5 in miniature, on CPU with gloo).

Tokens per rank stay fixed while the total length N = ranks * tokens grows; for every
rank count the script reports, per rank, forward and forward+backward time, bytes
sent and received (``longnet.parallel.comm_stats``), the memory autograd keeps for
backward and the growth of peak RSS. For comparison it also times the single-process
operator on the whole N. Prints a table and saves a PNG (and JSON) under
``benchmarks/results/``.

    python3 benchmarks/bench_distributed.py                 # about two minutes
    python3 benchmarks/bench_distributed.py --ranks 1 2 4 8 --tokens-per-rank 4096

Note: the ranks run as processes on this machine's cores; with more ranks than cores
they share cores and the per-rank wall-clock times grow for that reason alone. The
per-rank process CPU time ("CPU ms") measures the work a rank does regardless.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _peak_rss_growth_mib(fn) -> float:
    """How far the resident set rises above its level before ``fn()`` (Linux:
    the peak is reset through /proc/self/clear_refs; elsewhere ru_maxrss)."""
    try:
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        return (_status_kib("VmHWM") - base) / 1024.0
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024.0


def _time(fn, iters: int):
    """Median wall-clock and process CPU seconds of ``fn()``."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def _inputs(args, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(args.batch, n, args.heads, args.dim, generator=g)
    k = torch.randn(args.batch, n, args.kv_heads, args.dim, generator=g)
    v = torch.randn(args.batch, n, args.kv_heads, args.dim, generator=g)
    return [t.requires_grad_() for t in (q, k, v)]


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward during ``fn()``."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def _worker(rank, world, port, args, path, mode):
    torch.set_num_threads(args.threads)
    import torch.distributed as dist

    import longnet.parallel as lnp

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    q, k, v = _inputs(args, args.tokens_per_rank, seed=rank)
    ws, rs = args.segment_lengths, args.dilation_rates

    def fwd():
        with torch.no_grad():
            lnp.sequence_parallel_dilated_attention(q, k, v, ws, rs, is_causal=args.causal)

    def fwd_bwd():
        out = lnp.sequence_parallel_dilated_attention(q, k, v, ws, rs, is_causal=args.causal)
        out.sum().backward()

    if mode == "time":
        t_fwd, _ = _time(fwd, args.iters)
        t_fb, cpu_fb = _time(fwd_bwd, args.iters)
        lnp.reset_comm_stats()
        fwd_bwd()
        stats = lnp.comm_stats()
        result = {
            "fwd_s": t_fwd,
            "fwd_bwd_s": t_fb,
            "fwd_bwd_cpu_s": cpu_fb,
            "sent": stats.bytes_sent,
            "received": stats.bytes_received,
        }
    else:
        fwd_bwd()  # warm-up
        result = {
            "rss_growth_mib": _peak_rss_growth_mib(fwd_bwd),
            "saved": _saved_bytes(
                lambda: lnp.sequence_parallel_dilated_attention(
                    q, k, v, ws, rs, is_causal=args.causal
                )
            ),
        }
    with open(path, "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def _single_process(args, n: int) -> float:
    import longnet

    torch.set_num_threads(args.threads)

    q, k, v = _inputs(args, n, seed=0)

    def fwd_bwd():
        out = longnet.dilated_attention(
            q, k, v, args.segment_lengths, args.dilation_rates, is_causal=args.causal
        )
        out.sum().backward()

    return _time(fwd_bwd, args.iters)[1]


def _launch(args, world: int, mode: str) -> list:
    """Run ``world`` ranks in ``mode`` ("time" or "memory"); return their reports."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    paths = [os.path.join(RESULTS, f".dist_rank{r}.json") for r in range(world)]
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, args, paths[r], mode))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(args.timeout)
    if any(p.is_alive() or p.exitcode != 0 for p in procs):
        for p in procs:
            if p.is_alive():
                p.kill()
        raise RuntimeError(f"a rank of the {world}-process {mode} run failed or timed out")
    reps = []
    for path in paths:
        with open(path) as f:
            reps.append(json.load(f))
        os.remove(path)
    return reps


def run(args) -> list:
    rows = []
    for world in args.ranks:
        reps = _launch(args, world, "time")
        # The memory run makes glibc serve large blocks with mmap and return them on
        # free, so the resident set follows the live tensors (this slows it down).
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        try:
            mem = _launch(args, world, "memory")
        finally:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        n = world * args.tokens_per_rank
        rows.append(
            {
                "ranks": world,
                "N": n,
                "fwd_ms": 1e3 * max(r["fwd_s"] for r in reps),
                "fwd_bwd_ms": 1e3 * max(r["fwd_bwd_s"] for r in reps),
                "fwd_bwd_cpu_ms": 1e3 * max(r["fwd_bwd_cpu_s"] for r in reps),
                "sent_kib": max(r["sent"] for r in reps) / 1024,
                "received_kib": max(r["received"] for r in reps) / 1024,
                "saved_mib": max(r["saved"] for r in mem) / 2**20,
                "rss_growth_mib": max(r["rss_growth_mib"] for r in mem),
                "single_process_fwd_bwd_cpu_ms": 1e3 * _single_process(args, n),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tokens-per-rank", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument(
        "--segment-lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192]
    )
    parser.add_argument("--dilation-rates", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--name", default="distributed_cpu")
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)

    rows = run(args)
    print(
        f"sequence-parallel dilated attention, gloo on CPU: B={args.batch} "
        f"H={args.heads} Hk={args.kv_heads} D={args.dim} tokens/rank="
        f"{args.tokens_per_rank} w={args.segment_lengths} r={args.dilation_rates} "
        f"causal={args.causal} threads/rank={args.threads} cores={os.cpu_count()}"
    )
    head = (
        f"{'ranks':>5} {'N':>7} {'fwd ms':>8} {'fwd+bwd ms':>10} {'CPU ms':>8} "
        f"{'sent KiB':>9} {'recv KiB':>9} {'saved MiB':>9} {'RSS+ MiB':>8} "
        f"{'1-proc CPU ms':>13}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['ranks']:>5} {r['N']:>7} {r['fwd_ms']:>8.1f} {r['fwd_bwd_ms']:>10.1f} "
            f"{r['fwd_bwd_cpu_ms']:>8.1f} {r['sent_kib']:>9.1f} {r['received_kib']:>9.1f} "
            f"{r['saved_mib']:>9.2f} {r['rss_growth_mib']:>8.1f} "
            f"{r['single_process_fwd_bwd_cpu_ms']:>13.1f}"
        )
    print(
        "ms: per rank, the slowest rank; CPU ms: process CPU time of forward+backward "
        "(not inflated by ranks sharing cores); 1-proc: one process on the whole N"
    )

    with open(os.path.join(RESULTS, f"{args.name}.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["N"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(
        ns,
        [r["fwd_bwd_cpu_ms"] for r in rows],
        "o-",
        label="per rank, CPU time (sequence parallel)",
    )
    axes[0].plot(ns, [r["fwd_bwd_ms"] for r in rows], "^:", label="per rank, wall clock")
    axes[0].plot(
        ns,
        [r["single_process_fwd_bwd_cpu_ms"] for r in rows],
        "s--",
        label="one process, whole N, CPU time",
    )
    axes[0].set_ylabel("forward + backward (ms)")
    axes[0].legend(fontsize=8)
    axes[1].plot(ns, [r["sent_kib"] for r in rows], "o-", label="sent")
    axes[1].plot(ns, [r["received_kib"] for r in rows], "s--", label="received")
    axes[1].set_ylabel("KiB per rank (fwd + bwd)")
    axes[1].legend(fontsize=8)
    axes[2].plot(ns, [r["saved_mib"] for r in rows], "o-", label="saved for backward")
    axes[2].plot(ns, [r["rss_growth_mib"] for r in rows], "s--", label="peak RSS growth (fwd+bwd)")
    axes[2].set_ylabel("MiB per rank")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"total sequence length N (ranks x {args.tokens_per_rank})")
        ax.grid(alpha=0.3)
    fig.suptitle(
        "Sequence-parallel dilated attention, gloo on CPU "
        f"(w={args.segment_lengths}, r={args.dilation_rates})",
        fontsize=10,
    )
    fig.tight_layout()
    png = os.path.join(RESULTS, f"{args.name}.png")
    fig.savefig(png, dpi=110)
    print(f"saved {png}")


if __name__ == "__main__":
    main()
