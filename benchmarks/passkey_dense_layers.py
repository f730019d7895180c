#!/usr/bin/env python3
"""Which layers must read densely for SmolLM2-135M to find a passkey under dilated
attention? A probe for the long-context recipe.

The passkey prompt of ``benchmarks/passkey.py`` at one length inside the trained
context (4K by default: RoPE stays within its trained distances, so only the pattern
is tested), zero-shot. Every layer runs ``--segment-lengths`` / ``--dilation-rates``
except the layers of one set, which run one pattern ``(length, 1)``: dense causal
attention (``enable`` takes per-layer patterns). Each set's row gives the share of
trials found and the attention's share of the prompt's pairs (dense layers cost
``L^2 / 2`` pairs each, dilated ones what their patterns link), so the rows show the
cheapest set that still retrieves.

    python benchmarks/passkey_dense_layers.py                    # the default probe
    python benchmarks/passkey_dense_layers.py --sets "none;all;0-14;15-29"

Results go to ``--out-dir``/``--name``.{json,md} after every row.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import longnet  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import passkey  # noqa: E402  (benchmarks/passkey.py)
from common import machine_info, markdown_table, save_results  # noqa: E402

import longnet.integrations.transformers as lt  # noqa: E402
from longnet.cli import int_list  # noqa: E402

DEFAULT_SETS = "none;all;0-14;15-29;0-7;8-14;15-22;23-29;0,10,20;5,15,25"


def parse_sets(text: str, layers: int) -> list[tuple[str, list[int]]]:
    """``"none;all;0-14;3,7"`` as (label, sorted layer indices) pairs."""
    sets = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        if part == "none":
            chosen: set[int] = set()
        elif part == "all":
            chosen = set(range(layers))
        else:
            chosen = set()
            for item in part.split(","):
                lo, _, hi = item.partition("-")
                a, b = int(lo), int(hi or lo)
                if not 0 <= a <= b < layers:
                    raise SystemExit(f"--sets: {item!r} is outside layers 0..{layers - 1}")
                chosen.update(range(a, b + 1))
        sets.append((part, sorted(chosen)))
    return sets


def pairs_per_head(length: int, ws: list[int], rs: list[int], heads: int) -> float:
    """Mean over heads of the (query, key) pairs a layer with these patterns computes
    on a causal sequence of ``length``: per pattern, segment and head, ``k (k + 1) / 2``
    for the ``k`` positions at the head's offset (a pair two patterns link counts
    twice, as the work does)."""
    total = 0
    for w, r in zip(ws, rs):
        for start in range(0, length, w):
            size = min(w, length - start)
            for j in range(heads):
                k = len(range(j % r, size, r))
                total += k * (k + 1) // 2
    return total / heads


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--depths", type=passkey.depth_list, default=[0.0, 0.25, 0.5])
    p.add_argument("--keys", type=int, default=2, help="trials per depth")
    p.add_argument("--segment-lengths", type=int_list, default=[1024, 4096])
    p.add_argument("--dilation-rates", type=int_list, default=[1, 4])
    p.add_argument("--sets", default=DEFAULT_SETS, help="';'-separated layer sets made dense")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--name", default="passkey_dense_layers")
    p.add_argument("--quiet", action="store_true")
    return p


def table(results: dict[str, Any]) -> str:
    rows = [
        [
            r["set"],
            str(len(r["dense_layers"])),
            f"{r['found']}/{r['trials']}",
            f"{r['pairs_vs_dense']:.2f}",
            f"{r['seconds']:.0f}",
        ]
        for r in results["rows"]
    ]
    headers = ["dense layers", "count", "found", "pairs vs all dense", "s"]
    return markdown_table(headers, rows)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    from longnet.integrations.smollm2 import load_smollm2

    log = (lambda *a, **k: None) if args.quiet else print
    torch.set_num_threads(max(1, args.threads))
    transformers.logging.set_verbosity_error()
    model, tokenizer = load_smollm2(torch.float32)
    layers = model.config.num_hidden_layers
    heads = model.config.num_attention_heads
    sets = parse_sets(args.sets, layers)
    trials = passkey.make_trials(tokenizer, [args.length], args.depths, args.keys, args.seed)
    ws, rs = args.segment_lengths, args.dilation_rates
    n = max(t.ids.numel() for t in trials)
    dense_pairs = n * (n + 1) / 2
    sparse_pairs = pairs_per_head(n, ws, rs, heads)
    results: dict[str, Any] = {
        "length": args.length,
        "depths": args.depths,
        "keys": args.keys,
        "segment_lengths": ws,
        "dilation_rates": rs,
        "command": " ".join(sys.argv),
        "machine": machine_info(args.threads),
        "rows": [],
    }
    for label, dense in sets:
        per_ws = [[args.length] if i in dense else ws for i in range(layers)]
        per_rs = [[1] if i in dense else rs for i in range(layers)]
        lt.enable(model, per_ws, per_rs)
        t0 = time.perf_counter()
        records = passkey.score(model, trials, desc=label, quiet=args.quiet)
        pairs = len(dense) * dense_pairs + (layers - len(dense)) * sparse_pairs
        row = {
            "set": label,
            "dense_layers": dense,
            "found": sum(r["found"] for r in records),
            "trials": len(records),
            "by_depth": {
                str(d): [r["found"] for r in records if r["depth"] == d] for d in args.depths
            },
            "pairs_vs_dense": pairs / (layers * dense_pairs),
            "seconds": time.perf_counter() - t0,
        }
        results["rows"].append(row)
        log(
            f"{label:>12}: found {row['found']}/{row['trials']}, pairs {row['pairs_vs_dense']:.2f} of dense"
        )
        save_results(results, args.out_dir, args.name, table, lambda r, p: False)
    log(table(results))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
