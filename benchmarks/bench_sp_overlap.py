#!/usr/bin/env python3
"""Backward time of sequence-parallel dilated attention on 2 gloo ranks with the
backward exchange overlapping the local patterns' backward, and without
(``longnet.parallel.set_backward_overlap``), interleaved A/B in one run.

    python benchmarks/bench_sp_overlap.py            # writes benchmarks/results/sp_overlap_cpu.*
    python benchmarks/bench_sp_overlap.py --links native,1,0.1

Loopback gloo moves megabytes in milliseconds, far less than the compute, so the
overlap has almost nothing to hide there. ``--links`` also runs every case over an
emulated link of the given GB/s: every all-to-all still runs on gloo, and waiting
for it returns no earlier than ``bytes / bandwidth`` after it was started (the larger
of the bytes this rank sends and receives), as a link of that bandwidth would. The
time a rank spends waiting for the emulated link (``exposed``) is what the overlap
did not hide.
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


class _EmulatedLink:
    """Makes every all-to-all of ``longnet.parallel.collectives`` take at least ``bytes / bw``
    from its start to the end of its wait (``bw`` in bytes/s; None: gloo as is) and
    sums the time waits spent beyond gloo's own completion."""

    def __init__(self, dist_utils):
        self._mod, self._launch = dist_utils, dist_utils._launch
        self.bandwidth: float | None = None
        self.exposed_s = 0.0
        dist_utils._launch = self._launch_slow

    def _launch_slow(self, x, send_sizes, recv_sizes, group):
        out, (work, buf) = self._launch(x, send_sizes, recv_sizes, group)
        if self.bandwidth is None:
            return out, (work, buf)
        rank = self._mod.dist.get_rank(group)
        item = x.element_size()
        nbytes = item * max(
            sum(n for d, n in enumerate(send_sizes) if d != rank),
            sum(n for d, n in enumerate(recv_sizes) if d != rank),
        )
        return out, (_SlowWork(work, time.perf_counter() + nbytes / self.bandwidth, self), buf)


class _SlowWork:
    def __init__(self, work, ready_at: float, link: _EmulatedLink):
        self._work, self._ready_at, self._link = work, ready_at, link

    def wait(self, timeout=None):
        ok = self._work.wait(timeout=timeout) if timeout is not None else self._work.wait()
        late = self._ready_at - time.perf_counter()
        if late > 0:
            self._link.exposed_s += late
            time.sleep(late)
        return ok


def _worker(rank, world, port, reps, links, out):
    import torch
    import torch.distributed as dist

    import longnet.parallel as lnp
    import longnet.parallel.collectives as dist_utils

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    link = _EmulatedLink(dist_utils)
    result = {}
    for name, (n, h, d, ws, rs) in CONFIGS.items():
        g = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(1, n, h, d, generator=g, requires_grad=True) for _ in range(3))
        lnp.reset_comm_stats()
        o = lnp.sequence_parallel_dilated_attention(q, k, v, ws, rs, is_causal=True)
        o.square().sum().backward()
        q.grad = k.grad = v.grad = None
        sent = lnp.comm_stats().bytes_sent
        for gbs in links:
            link.bandwidth = None if gbs is None else gbs * 1e9
            times = {"overlap": [], "no overlap": []}
            exposed = {"overlap": [], "no overlap": []}
            for _ in range(reps):
                for mode in times:
                    lnp.set_backward_overlap(mode == "overlap")
                    o = lnp.sequence_parallel_dilated_attention(q, k, v, ws, rs, is_causal=True)
                    loss = o.square().sum()
                    dist.barrier()
                    link.exposed_s = 0.0
                    t0 = time.perf_counter()
                    loss.backward()
                    exposed[mode].append(link.exposed_s)
                    dist.barrier()
                    times[mode].append(time.perf_counter() - t0)
                    q.grad = k.grad = v.grad = None
            # The slower rank sets the step: report the larger exposed wait of the two.
            both = torch.tensor([exposed["overlap"], exposed["no overlap"]], dtype=torch.float64)
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            exposed = {"overlap": both[0].tolist(), "no overlap": both[1].tolist()}
            key = "native" if gbs is None else f"{gbs:g} GB/s"
            result[f"{name} | {key}"] = {
                "config": name,
                "link": key,
                "times_s": times,
                "exposed_s": exposed,
                "bytes_sent_fwd_bwd": sent,
            }
    link.bandwidth = None
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    os._exit(0)


def _links(text: str) -> list[float | None]:
    out: list[float | None] = []
    for part in text.split(","):
        part = part.strip()
        out.append(None if part == "native" else float(part))
        if out[-1] is not None and not out[-1] > 0:
            raise argparse.ArgumentTypeError(f"--links: GB/s must be > 0, got {part}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument(
        "--links",
        type=_links,
        default=_links("native,1,0.1"),
        help="comma list: 'native' (loopback gloo as is) and emulated link GB/s",
    )
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "sp_overlap_cpu"))
    args = p.parse_args(argv)
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = args.out + ".raw.json"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    mp.spawn(_worker, args=(2, port, args.reps, args.links, tmp), nprocs=2)
    with open(tmp) as f:
        raw = json.load(f)
    os.remove(tmp)
    rows = {}
    print(
        f"{'configuration':<34} {'link':>9} {'overlap ms':>11} {'no overlap ms':>14} "
        f"{'gain':>6} {'exposed ms':>14} {'sent KiB':>9}"
    )
    for name, r in raw.items():
        a = statistics.median(r["times_s"]["overlap"])
        b = statistics.median(r["times_s"]["no overlap"])
        ea = statistics.median(r["exposed_s"]["overlap"])
        eb = statistics.median(r["exposed_s"]["no overlap"])
        rows[name] = {
            **r,
            "median_overlap_s": a,
            "median_no_overlap_s": b,
            "median_exposed_overlap_s": ea,
            "median_exposed_no_overlap_s": eb,
            "gain": 1 - a / b,
        }
        print(
            f"{r['config']:<34} {r['link']:>9} {1e3 * a:>11.1f} {1e3 * b:>14.1f} "
            f"{100 * (1 - a / b):>5.1f}% {1e3 * ea:>6.1f} / {1e3 * eb:<6.1f} "
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
    fig, ax = plt.subplots(figsize=(9, 4.5))
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
    labels = [f"{rows[n]['config'].split(' (')[0]}\n{rows[n]['link']}" for n in names]
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("backward ms (median, 2 gloo ranks)")
    ax.set_title(
        f"sequence-parallel backward, native and emulated links, load {load[0]:.1f}", fontsize=9
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=110)
    print(f"saved {args.out}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
