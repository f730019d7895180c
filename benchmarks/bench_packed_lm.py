#!/usr/bin/env python3
"""A packed LongNetLM training step (forward + backward over one row of documents
with ``cu_seqlens``) timed in two checkouts of longnet, side by side.

Each checkout is a source tree with its extension built in place. Rounds alternate
between the checkouts, each round a fresh process per checkout (the same model and
documents from the same seeds, one warm-up step, then ``--repeats`` timed steps), so
load changes on a shared machine fall on both alike; the table gives each checkout's
median and the ratio, per document-length mix of benchmarks/bench_varlen.py.

    git worktree add /tmp/base 361b5fc && cp longnet/_C*.so /tmp/base/longnet/
    python benchmarks/bench_packed_lm.py --other /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_varlen import mixes  # noqa: E402
from common import markdown_table, time_in_checkout  # noqa: E402

_WORKER = r"""
import json, sys, time
import torch
from longnet.model import LongNetConfig, LongNetLM
from longnet.packing import cu_seqlens_from_lengths
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
torch.manual_seed(0)
model = LongNetLM(LongNetConfig(
    vocab_size=259, num_layers=cfg["layers"], embed_dim=cfg["embed_dim"],
    num_heads=cfg["heads"], segment_lengths=cfg["ws"], dilation_rates=cfg["rs"]))
if cfg["checkpointing"]:
    model.set_activation_checkpointing(True)
total = sum(cfg["lengths"])
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, 256, (1, total), generator=g)
cu = cu_seqlens_from_lengths(cfg["lengths"])
def step():
    model.zero_grad(set_to_none=True)
    _, loss = model(ids, ids, cu_seqlens=cu)
    loss.backward()
step()
times = []
for _ in range(cfg["repeats"]):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
print("RESULT " + json.dumps(times))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--other", required=True, help="the other checkout (extension built)")
    p.add_argument("--total", type=int, default=8192, help="packed tokens (default: 8192)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per round (default: 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    rows = []
    for name, lengths in mixes(args.total).items():
        cfg = dict(
            lengths=lengths,
            layers=args.layers,
            embed_dim=args.embed_dim,
            heads=args.heads,
            ws=[512, 1024, 2048],
            rs=[1, 2, 4],
            repeats=args.repeats,
            threads=args.threads,
            checkpointing=args.checkpointing,
        )
        this: list[float] = []
        other: list[float] = []
        for _ in range(args.rounds):
            this += time_in_checkout(ROOT, _WORKER, cfg)
            other += time_in_checkout(args.other, _WORKER, cfg)
        t_this, t_other = statistics.median(this), statistics.median(other)
        rows.append(
            {
                "mix": name,
                "documents": len(lengths),
                "this ms": round(1e3 * t_this, 1),
                "other ms": round(1e3 * t_other, 1),
                "this / other": round(t_this / t_other, 3),
            }
        )
        print(f"{name}: {rows[-1]}", flush=True)
    print(markdown_table(list(rows[0]), [list(r.values()) for r in rows]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
