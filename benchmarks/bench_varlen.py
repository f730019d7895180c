"""Packed documents (``cu_seqlens_q``/``cu_seqlens_k``) against the same documents run
one call each, and against a padded batch (one row per document, key ranges).

For each document-length mix it times forward+backward of

* ``packed``: one call on the packed row (1, total, H, D) with cu_seqlens;
* ``alone``: one call per document, summed (what a per-document loop costs);
* ``padded``: a (S, max_len, H, D) batch with ``key_end`` = each length (pads at the end).

and prints ``packed / alone`` (the overhead of packing; <= 1.1 is the goal) and
``padded / packed`` (what padding wastes). Writes ``varlen_cpu.json`` and
``varlen_cpu.png`` under ``--out-dir``.

    python benchmarks/bench_varlen.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, markdown_table  # noqa: E402

import longnet  # noqa: E402
from longnet.packing import cu_seqlens_from_lengths  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 8, 8, 64
WS, RS = [512, 1024, 2048], [1, 2, 4]


def mixes(total: int, seed: int = 0) -> dict[str, list[int]]:
    """Document lengths summing to ``total``: many short, a wide spread, a few long."""
    gen = torch.Generator().manual_seed(seed)

    def fill(lo: int, hi: int) -> list[int]:
        lengths: list[int] = []
        while sum(lengths) < total:
            lengths.append(int(torch.randint(lo, hi + 1, (1,), generator=gen)))
        lengths[-1] -= sum(lengths) - total
        return lengths

    return {
        "64+ short (64-512)": fill(64, 512),
        "spread (16-6144)": fill(16, 6144),
        "4 long": [total // 4] * 4,
    }


def fwd_bwd(fn, inputs) -> None:
    out = fn(*inputs)
    out.backward(torch.ones_like(out))


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) if repeats < 3 else statistics.median(times)


def leaf(*shape, dtype):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def run_mix(lengths: list[int], dtype: torch.dtype, repeats: int) -> dict[str, float]:
    total, s, longest = sum(lengths), len(lengths), max(lengths)
    cu = cu_seqlens_from_lengths(lengths)
    kw = dict(is_causal=True)
    packed_in = [leaf(1, total, h, HEAD_DIM, dtype=dtype) for h in (HEADS, KV_HEADS, KV_HEADS)]

    def packed():
        fwd_bwd(
            lambda q, k, v: longnet.dilated_attention(q, k, v, WS, RS, cu_seqlens_q=cu, **kw),
            packed_in,
        )

    alone_in = [
        [leaf(1, n, h, HEAD_DIM, dtype=dtype) for h in (HEADS, KV_HEADS, KV_HEADS)] for n in lengths
    ]

    def alone():
        for inputs in alone_in:
            fwd_bwd(lambda q, k, v: longnet.dilated_attention(q, k, v, WS, RS, **kw), inputs)

    padded_in = [leaf(s, longest, h, HEAD_DIM, dtype=dtype) for h in (HEADS, KV_HEADS, KV_HEADS)]
    key_end = torch.tensor(lengths)

    def padded():
        # Pads at the end of each row; queries are the whole row, bottom-right aligned,
        # so the pad queries fall after the keys and attend them too (as padding does).
        fwd_bwd(
            lambda q, k, v: longnet.dilated_attention(q, k, v, WS, RS, key_end=key_end, **kw),
            padded_in,
        )

    packed()  # warm-up of every path
    alone()
    padded()
    # Interleaved, so that load changes affect all three alike.
    results: dict[str, list[float]] = {"packed": [], "alone": [], "padded": []}
    for _ in range(repeats):
        for name, fn in (("packed", packed), ("alone", alone), ("padded", padded)):
            results[name].append(best_of(fn, 1))
    return {name: statistics.median(ts) for name, ts in results.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--total", type=int, default=16384, help="packed tokens (default: 16384)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default: 3)")
    p.add_argument(
        "--dtypes", default="float32,bfloat16", help="comma-separated (default: float32,bfloat16)"
    )
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, records = [], []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for mix, lengths in mixes(args.total).items():
            t = run_mix(lengths, dtype, args.repeats)
            record = {
                "dtype": dtype_name,
                "mix": mix,
                "documents": len(lengths),
                "total": sum(lengths),
                "seconds": t,
                "packed_over_alone": t["packed"] / t["alone"],
                "padded_over_packed": t["padded"] / t["packed"],
            }
            records.append(record)
            rows.append(
                [
                    dtype_name,
                    mix,
                    len(lengths),
                    f"{t['packed']:.3f}",
                    f"{t['alone']:.3f}",
                    f"{t['padded']:.3f}",
                    f"{record['packed_over_alone']:.3f}",
                    f"{record['padded_over_packed']:.2f}",
                ]
            )
            print(rows[-1], flush=True)
    headers = [
        "dtype",
        "documents",
        "S",
        "packed s",
        "alone s",
        "padded s",
        "packed/alone",
        "padded/packed",
    ]
    print(markdown_table(headers, rows))
    os.makedirs(args.out_dir, exist_ok=True)
    info = {
        "machine": machine_info(args.threads),
        "load_avg": os.getloadavg(),
        "config": {
            "heads": HEADS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "segment_lengths": WS,
            "dilation_rates": RS,
            "causal": True,
            "total": args.total,
            "pass": "forward+backward",
        },
        "results": records,
    }
    with open(os.path.join(args.out_dir, "varlen_cpu.json"), "w") as f:
        json.dump(info, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['dtype']}\n{r['mix']}" for r in records]
    x = range(len(records))
    for i, name in enumerate(("packed", "alone", "padded")):
        ax.bar(
            [j + (i - 1) * 0.27 for j in x], [r["seconds"][name] for r in records], 0.27, label=name
        )
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("forward+backward (s)")
    ax.set_title(f"Packed documents, {args.total} tokens, {args.threads} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "varlen_cpu.png"), dpi=110)


if __name__ == "__main__":
    main()
