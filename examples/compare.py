#!/usr/bin/env python3
"""Dilated vs dense vs sliding-window attention at the same training budget.

A miniature of Table 2 in the LongNet paper: the same byte-level model is trained
three times with identical data, steps, batch and sequence length, changing only
the attention pattern (see ``train_lm.py --attention``), then every model's
validation loss is measured at several context lengths.

    python examples/compare.py                       # tiny defaults, a few minutes on CPU
    python examples/compare.py --seq-len 2048 --steps 1000 --device cuda

Writes ``compare.json`` and ``compare.png`` under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

# Idle OpenMP threads sleep instead of spinning: on a busy or shared CPU spinning
# threads slow every parallel region down several times. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_lm  # noqa: E402

from longnet.cli import choice_list, int_list  # noqa: E402
from longnet.data import eval_batches  # noqa: E402
from longnet.model import LongNetLM  # noqa: E402
from longnet.parallel import evaluate_loss  # noqa: E402

VARIANTS = ("dilated", "dense", "sliding")


def main(argv: Sequence[str] | None = None) -> dict[str, dict[int, float]]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--variants",
        type=choice_list(VARIANTS),
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {VARIANTS}",
    )
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--segment-lengths", type=int_list, default=[64, 128, 256, 512])
    p.add_argument("--dilation-rates", type=int_list, default=[1, 2, 4, 8])
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="sliding block size (default: first segment length)",
    )
    p.add_argument(
        "--eval-lengths",
        type=int_list,
        default=None,
        help="context lengths to evaluate (default: seq_len/4, /2, 1)",
    )
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-train-bytes", type=int, default=4_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", default="runs/compare")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    variants: list[str] = args.variants
    lengths = args.eval_lengths or [args.seq_len // 4, args.seq_len // 2, args.seq_len]

    results: dict[str, dict[int, float]] = {}
    val_tokens = None
    for variant in variants:
        out_dir = os.path.join(args.out_dir, variant)
        targs = train_lm.build_parser().parse_args([])
        targs.__dict__.update(
            attention=variant,
            seq_len=args.seq_len,
            segment_lengths=args.segment_lengths,
            dilation_rates=args.dilation_rates,
            window=args.window,
            steps=args.steps,
            batch_size=args.batch_size,
            layers=args.layers,
            embed_dim=args.embed_dim,
            heads=args.heads,
            lr=args.lr,
            warmup_steps=max(1, args.steps // 10),
            eval_interval=max(1, args.steps // 3),
            save_interval=args.steps,
            eval_windows=8,
            max_train_bytes=args.max_train_bytes,
            seed=args.seed,
            device=args.device,
            out_dir=out_dir,
            no_plot=True,
            quiet=args.quiet,
        )
        print(f"\n=== {variant} ===")
        metrics = train_lm.run(targs)
        if val_tokens is None:
            _, val_tokens = train_lm.load_data(targs, log=lambda *a: None)
        model = LongNetLM.from_pretrained(
            os.path.join(out_dir, "checkpoint"), map_location=args.device
        )
        results[variant] = {}
        for n in lengths:
            batches = eval_batches(val_tokens, n, args.eval_windows, args.batch_size)
            results[variant][n] = evaluate_loss(model, batches, device=args.device)
        results[variant]["train_s"] = metrics["elapsed_s"]

    header = "variant   " + "".join(f"{f'ctx {n}':>10}" for n in lengths) + f"{'train s':>10}"
    print("\nvalidation loss (nats / byte) by context length")
    print(header)
    for variant, row in results.items():
        print(
            f"{variant:<10}"
            + "".join(f"{row[n]:>10.4f}" for n in lengths)
            + f"{row['train_s']:>10.0f}"
        )
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "compare.json"), "w") as f:
        json.dump(
            {
                "args": vars(args),
                "results": {v: {str(k): x for k, x in r.items()} for v, r in results.items()},
            },
            f,
            indent=1,
        )
    _plot(results, lengths, os.path.join(args.out_dir, "compare.png"), args)
    return results


def _plot(results, lengths: list[int], path: str, args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, row in results.items():
        ax.plot(lengths, [row[n] for n in lengths], "o-", label=variant)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(n) for n in lengths])
    ax.set_xlabel("evaluation context length (bytes)")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.set_title(f"same budget: {args.steps} steps x {args.batch_size} x {args.seq_len}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
