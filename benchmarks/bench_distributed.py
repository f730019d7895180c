"""Sequence-parallel dilated attention: per-rank cost as the sequence grows with the
number of ranks (LongNet Figure 5 in miniature, on CPU with gloo).

Tokens per rank stay fixed while the total length N = ranks * tokens grows; for every
rank count the script reports, per rank, forward and forward+backward time, bytes
sent and received (``longnet.distributed.comm_stats``), the memory autograd keeps for
backward and the growth of peak RSS. For comparison it also times the single-process
operator on the whole N. Prints a table and saves a PNG (and JSON) under
``benchmarks/results/``.

    python3 benchmarks/bench_distributed.py                 # about two minutes
    python3 benchmarks/bench_distributed.py --ranks 1 2 4 8 --tokens-per-rank 4096

Note: the ranks run as processes on this machine's cores; with more ranks than cores
they share cores and the per-rank times grow for that reason alone.
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


def _rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def _worker(rank, world, port, args, path):
    torch.set_num_threads(args.threads)
    import torch.distributed as dist

    import longnet.distributed as lnd

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    q, k, v = _inputs(args, args.tokens_per_rank, seed=rank)
    ws, rs = args.segment_lengths, args.dilation_rates
    rss0 = _rss_peak_mib()

    def fwd():
        with torch.no_grad():
            lnd.sequence_parallel_dilated_attention(q, k, v, ws, rs, is_causal=args.causal)

    def fwd_bwd():
        out = lnd.sequence_parallel_dilated_attention(q, k, v, ws, rs, is_causal=args.causal)
        out.sum().backward()

    t_fwd = _time(fwd, args.iters)
    t_fb = _time(fwd_bwd, args.iters)
    lnd.reset_comm_stats()
    fwd_bwd()
    stats = lnd.comm_stats()
    saved = _saved_bytes(
        lambda: lnd.sequence_parallel_dilated_attention(q, k, v, ws, rs, is_causal=args.causal))
    with open(path, "w") as f:
        json.dump({"rank": rank, "fwd_s": t_fwd, "fwd_bwd_s": t_fb,
                   "sent": stats.bytes_sent, "received": stats.bytes_received,
                   "saved": saved, "rss_growth_mib": _rss_peak_mib() - rss0}, f)
    dist.barrier()
    dist.destroy_process_group()


def _single_process(args, n: int) -> float:
    import longnet

    torch.set_num_threads(args.threads)

    q, k, v = _inputs(args, n, seed=0)

    def fwd_bwd():
        out = longnet.dilated_attention(q, k, v, args.segment_lengths, args.dilation_rates,
                                        is_causal=args.causal)
        out.sum().backward()

    return _time(fwd_bwd, args.iters)


def run(args) -> list:
    rows = []
    ctx = mp.get_context("spawn")
    for world in args.ranks:
        port = _free_port()
        paths = [os.path.join(RESULTS, f".dist_rank{r}.json") for r in range(world)]
        procs = [ctx.Process(target=_worker, args=(r, world, port, args, paths[r]))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(args.timeout)
        if any(p.is_alive() or p.exitcode != 0 for p in procs):
            for p in procs:
                if p.is_alive():
                    p.kill()
            raise RuntimeError(f"a rank of the {world}-process run failed or timed out")
        reps = []
        for path in paths:
            with open(path) as f:
                reps.append(json.load(f))
            os.remove(path)
        n = world * args.tokens_per_rank
        rows.append({
            "ranks": world, "N": n,
            "fwd_ms": 1e3 * max(r["fwd_s"] for r in reps),
            "fwd_bwd_ms": 1e3 * max(r["fwd_bwd_s"] for r in reps),
            "sent_kib": max(r["sent"] for r in reps) / 1024,
            "received_kib": max(r["received"] for r in reps) / 1024,
            "saved_mib": max(r["saved"] for r in reps) / 2**20,
            "rss_growth_mib": max(r["rss_growth_mib"] for r in reps),
            "single_process_fwd_bwd_ms": 1e3 * _single_process(args, n),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tokens-per-rank", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--segment-lengths", type=int, nargs="+",
                        default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--dilation-rates", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--name", default="distributed_cpu")
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)

    rows = run(args)
    print(f"sequence-parallel dilated attention, gloo on CPU: B={args.batch} "
          f"H={args.heads} Hk={args.kv_heads} D={args.dim} tokens/rank="
          f"{args.tokens_per_rank} w={args.segment_lengths} r={args.dilation_rates} "
          f"causal={args.causal} threads/rank={args.threads} cores={os.cpu_count()}")
    head = (f"{'ranks':>5} {'N':>7} {'fwd ms':>8} {'fwd+bwd ms':>10} {'sent KiB':>9} "
            f"{'recv KiB':>9} {'saved MiB':>9} {'RSS+ MiB':>8} {'1-proc fwd+bwd ms':>17}")
    print(head)
    for r in rows:
        print(f"{r['ranks']:>5} {r['N']:>7} {r['fwd_ms']:>8.1f} {r['fwd_bwd_ms']:>10.1f} "
              f"{r['sent_kib']:>9.1f} {r['received_kib']:>9.1f} {r['saved_mib']:>9.2f} "
              f"{r['rss_growth_mib']:>8.1f} {r['single_process_fwd_bwd_ms']:>17.1f}")

    with open(os.path.join(RESULTS, f"{args.name}.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["N"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(ns, [r["fwd_bwd_ms"] for r in rows], "o-", label="per rank (sequence parallel)")
    axes[0].plot(ns, [r["single_process_fwd_bwd_ms"] for r in rows], "s--",
                 label="one process, whole N")
    axes[0].set_ylabel("forward + backward (ms)")
    axes[0].legend(fontsize=8)
    axes[1].plot(ns, [r["sent_kib"] for r in rows], "o-", label="sent")
    axes[1].plot(ns, [r["received_kib"] for r in rows], "s--", label="received")
    axes[1].set_ylabel("KiB per rank (fwd + bwd)")
    axes[1].legend(fontsize=8)
    axes[2].plot(ns, [r["saved_mib"] for r in rows], "o-", label="saved for backward")
    axes[2].plot(ns, [r["rss_growth_mib"] for r in rows], "s--", label="peak RSS growth")
    axes[2].set_ylabel("MiB per rank")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("total sequence length N (ranks x %d)" % args.tokens_per_rank)
        ax.grid(alpha=0.3)
    fig.suptitle("Sequence-parallel dilated attention, gloo on CPU "
                 f"(w={args.segment_lengths}, r={args.dilation_rates})", fontsize=10)
    fig.tight_layout()
    png = os.path.join(RESULTS, f"{args.name}.png")
    fig.savefig(png, dpi=110)
    print(f"saved {png}")


if __name__ == "__main__":
    main()
