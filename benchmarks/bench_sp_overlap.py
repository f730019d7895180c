#!/usr/bin/env python3
"""Backward time of sequence-parallel dilated attention on 2 gloo ranks with the
backward exchange overlapping the local patterns' backward, and without
(``longnet.distributed.set_backward_overlap``), interleaved A/B in one run.

    python benchmarks/bench_sp_overlap.py            # writes benchmarks/results/sp_overlap_cpu.*
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {  # name: (L per rank, H, D, segment_lengths, dilation_rates)
    "few rows exchanged (w/r = 512)": (4096, 8, 64, [512, 2048, 8192], [1, 4, 16]),
    "many rows exchanged (w/r = 4096)": (4096, 8, 64, [512, 8192], [1, 2]),
}


def _worker(rank, world, port, reps, out):
    import torch
    import torch.distributed as dist

    import longnet.distributed as lnd

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    result = {}
    for name, (n, h, d, ws, rs) in CONFIGS.items():
        g = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(1, n, h, d, generator=g, requires_grad=True) for _ in range(3))
        times = {"overlap": [], "no overlap": []}
        for _ in range(reps):
            for mode in times:
                lnd.set_backward_overlap(mode == "overlap")
                o = lnd.sequence_parallel_dilated_attention(q, k, v, ws, rs, is_causal=True)
                loss = o.square().sum()
                dist.barrier()
                t0 = time.perf_counter()
                loss.backward()
                dist.barrier()
                times[mode].append(time.perf_counter() - t0)
                q.grad = k.grad = v.grad = None
        lnd.reset_comm_stats()
        o = lnd.sequence_parallel_dilated_attention(q, k, v, ws, rs, is_causal=True)
        o.square().sum().backward()
        result[name] = {"times_s": times, "bytes_sent_fwd_bwd": lnd.comm_stats().bytes_sent}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    os._exit(0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "sp_overlap_cpu"))
    args = p.parse_args(argv)
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = args.out + ".raw.json"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    mp.spawn(_worker, args=(2, port, args.reps, tmp), nprocs=2)
    with open(tmp) as f:
        raw = json.load(f)
    os.remove(tmp)
    rows = {}
    print(
        f"{'configuration':<34} {'overlap ms':>11} {'no overlap ms':>14} {'gain':>6} "
        f"{'sent KiB':>9}"
    )
    for name, r in raw.items():
        a = statistics.median(r["times_s"]["overlap"])
        b = statistics.median(r["times_s"]["no overlap"])
        rows[name] = {**r, "median_overlap_s": a, "median_no_overlap_s": b, "gain": 1 - a / b}
        print(
            f"{name:<34} {1e3 * a:>11.1f} {1e3 * b:>14.1f} {100 * (1 - a / b):>5.1f}% "
            f"{r['bytes_sent_fwd_bwd'] / 1024:>9.0f}"
        )
    load = os.getloadavg()
    with open(args.out + ".json", "w") as f:
        json.dump(
            {
                "command": "python benchmarks/bench_sp_overlap.py "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                "load_average": load,
                "configs": {k: list(map(str, v)) for k, v in CONFIGS.items()},
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
        return 0
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(rows)
    xs = range(len(names))
    ax.bar(
        [x - 0.2 for x in xs],
        [1e3 * rows[n]["median_overlap_s"] for n in names],
        0.4,
        label="backward exchange overlapped",
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [1e3 * rows[n]["median_no_overlap_s"] for n in names],
        0.4,
        label="not overlapped",
    )
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_ylabel("backward ms (median, 2 gloo ranks)")
    ax.set_title(f"sequence-parallel backward, load {load[0]:.1f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=110)
    print(f"saved {args.out}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
