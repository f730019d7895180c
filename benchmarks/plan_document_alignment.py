#!/usr/bin/env python3
"""What aligning rank-crossing documents would save in sequence-parallel traffic:
the planner (``longnet.plan``, whose bytes equal ``comm_stats()`` on gloo ranks) on
packed rows as drawn, and on the same documents packed so that every document that
crosses a rank boundary starts on a multiple of ``A`` tokens from that boundary
(a filler of ignored tokens before it, the row cut at the end).

A document whose first token sits ``g - c`` tokens before rank boundary ``g`` puts
a segment of every pattern with ``(g - c) % w != 0`` across that boundary, where one
unbroken sequence keeps the patterns with ``w <= L`` inside ranks; those exchanged
rows are the minimal ones for that split (tests/test_plan.py), so only moving the
document (or the boundary) removes them. With ``(g - c) % A == 0`` the patterns with
``w | A`` stay inside ranks.

    python benchmarks/plan_document_alignment.py --tokens 64M --ranks 64 --align 0 64K 1M
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import markdown_table  # noqa: E402

from longnet.plan import plan_run  # noqa: E402
from longnet.plan.documents import document_lengths  # noqa: E402
from longnet.plan.sweeps import geometric_patterns  # noqa: E402
from longnet.plan.units import parse_count  # noqa: E402


def aligned(lengths: list[int], tokens: int, chunk: int, align: int) -> tuple[list[int], int]:
    """``lengths`` packed in order with a filler (a document of ignored tokens) before
    every document that would cross a rank boundary ``g`` unaligned, so that it starts
    a multiple of ``align`` tokens before ``g``; cut at ``tokens``. Returns the new
    lengths and the filler tokens."""
    out: list[int] = []
    pos = filler = 0
    for n in lengths:
        if pos >= tokens:
            break
        g = (pos // chunk + 1) * chunk  # the next rank boundary
        if align and pos + n > g and pos < g and (g - pos) % align:
            pad = (g - pos) % align
            out.append(pad)
            filler += pad
            pos += pad
        n = min(n, tokens - pos)
        out.append(n)
        pos += n
    if pos < tokens:
        out.append(tokens - pos)
    return out, filler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="64M")
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--first-w", default="2048")
    p.add_argument("--doc-length-dist", default="lognormal:64K,1")
    p.add_argument("--doc-seed", type=int, default=7)
    p.add_argument("--align", nargs="+", default=["0", "64K", "1M"], help="0: as drawn")
    args = p.parse_args()
    tokens, chunk = parse_count(args.tokens), parse_count(args.tokens) // args.ranks
    ws, rs = geometric_patterns(tokens, parse_count(args.first_w))
    common = dict(
        heads=args.heads, head_dim=args.head_dim, segment_lengths=ws, dilation_rates=rs,
        dtype="bfloat16", causal=True,
    )  # fmt: skip
    one = plan_run(tokens, args.ranks, **common)
    base_traffic = max(r.bytes_sent + r.bytes_received for r in one.per_rank)
    base_sent = max(r.bytes_sent_fwd for r in one.per_rank)
    base_act = max(r.activation_bytes for r in one.per_rank)
    drawn = document_lengths(tokens, distribution=args.doc_length_dist, seed=args.doc_seed)
    rows = []
    for a in args.align:
        align = parse_count(a)
        lengths, filler = aligned(drawn, tokens, chunk, align)
        plan = plan_run(tokens, args.ranks, doc_lengths=lengths, **common)
        worst_sent = max(r.bytes_sent_fwd for r in plan.per_rank)
        worst_recv = max(r.bytes_received_fwd for r in plan.per_rank)
        worst = max(r.bytes_sent + r.bytes_received for r in plan.per_rank)
        act = max(r.activation_bytes for r in plan.per_rank)
        rows.append(
            [
                "as drawn" if not align else a,
                f"{100 * filler / tokens:.2f}%",
                f"{worst_sent / base_sent:.3f}",
                f"{worst_recv / base_sent:.3f}",
                f"{worst / base_traffic:.3f}",
                f"{act / base_act:.3f}",
            ]
        )
        print(rows[-1], flush=True)
    print(
        f"{args.tokens} tokens on {args.ranks} ranks, {args.doc_length_dist} documents "
        f"(seed {args.doc_seed}), causal, bf16; ratios of the worst rank to one unbroken "
        "sequence's worst rank"
    )
    print(
        markdown_table(
            [
                "crossing documents start",
                "filler",
                "sent fwd",
                "received fwd",
                "sent + received",
                "activations",
            ],
            rows,
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()
