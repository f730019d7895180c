#!/usr/bin/env python3
"""The same dilated-attention call timed in two builds of longnet, side by side.

Each build is a source checkout with its extension built in place (``python setup.py
build_ext --inplace``). Rounds alternate between the builds, each round a fresh
process per build (inputs drawn from the same seed, one warm-up call, then
``--repeats`` timed calls), so load changes on a shared machine fall on both alike;
the table gives each build's median and the ratio.

    # this checkout against the kernel of an older commit, at the CPU headline
    git worktree add /tmp/base dc19b22 && (cd /tmp/base && python setup.py build_ext --inplace)
    python benchmarks/bench_vs_build.py --other /tmp/base --dtype float32 --mode fwdbwd
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import pattern_flops, time_in_checkout  # noqa: E402
from longnet.cli import int_list  # noqa: E402

_WORKER = r"""
import json, sys, time
import torch
import longnet
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
dtype = getattr(torch, cfg["dtype"])
g = torch.Generator().manual_seed(0)
shape = (1, cfg["n"], cfg["heads"], cfg["head_dim"])
q, k, v = (torch.randn(shape, generator=g).to(dtype).requires_grad_() for _ in range(3))
grad = torch.randn(shape, generator=g).to(dtype)
def call():
    out = longnet.dilated_attention(q, k, v, cfg["w"], cfg["r"], is_causal=cfg["causal"])
    if cfg["mode"] == "fwdbwd":
        out.backward(grad)
        q.grad = k.grad = v.grad = None
call()
times = []
for _ in range(cfg["repeats"]):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
print("RESULT " + json.dumps(times))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--other", required=True, help="the other checkout (built in place)")
    p.add_argument("--this", default=ROOT, help="this checkout")
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--segment-lengths", type=int_list, default=[2048, 4096, 8192])
    p.add_argument("--dilation-rates", type=int_list, default=[1, 2, 4])
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mode", default="fwdbwd", choices=["fwd", "fwdbwd"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="JSON path for the times (default: print only)")
    args = p.parse_args(argv)
    for path in (args.other, args.this):
        if not os.path.isfile(os.path.join(path, "longnet", "__init__.py")):
            raise SystemExit(f"{path!r} is not a longnet checkout (no longnet/__init__.py)")
    cfg = {
        "n": args.n,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "w": args.segment_lengths,
        "r": args.dilation_rates,
        "causal": not args.non_causal,
        "dtype": args.dtype,
        "mode": args.mode,
        "repeats": args.repeats,
        "threads": args.threads,
    }
    flops = pattern_flops(
        args.n,
        args.heads,
        args.head_dim,
        args.segment_lengths,
        args.dilation_rates,
        cfg["causal"],
        backward=args.mode == "fwdbwd",
    )
    builds = {"this": args.this, "other": args.other}
    times: dict[str, list[float]] = {name: [] for name in builds}
    for i in range(args.rounds):
        for name, path in builds.items() if i % 2 == 0 else reversed(builds.items()):
            times[name] += time_in_checkout(path, _WORKER, cfg)
            print(f"round {i + 1}: {name:<5} {min(times[name][-args.repeats :]):.3f} s", flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"\nN = {args.n:,}, H = {args.heads}, D = {args.head_dim}, w = {args.segment_lengths}, "
        f"r = {args.dilation_rates}, {'causal' if cfg['causal'] else 'non-causal'}, "
        f"{args.dtype} {args.mode}, {args.threads} threads, load {os.getloadavg()[0]:.1f}"
    )
    print(f"{'build':<6} {'median s':>9} {'GFLOP/s':>8}  checkout")
    for name, path in builds.items():
        print(f"{name:<6} {med[name]:>9.3f} {flops / med[name] / 1e9:>8.1f}  {path}")
    print(f"this / other speed: {med['other'] / med['this']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "command": "python benchmarks/bench_vs_build.py "
                    + " ".join(argv if argv is not None else sys.argv[1:]),
                    "config": cfg,
                    "needed_flops": flops,
                    "builds": builds,
                    "times_s": times,
                    "median_s": med,
                    "speedup": med["other"] / med["this"],
                    "load_average": os.getloadavg(),
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
