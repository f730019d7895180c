"""``python -m longnet.plan``: plan a sequence-parallel LongNet run from the command
line and print it as tables (or JSON), with a sweep over rank counts, a plot, packed
documents against the same row without them, and a training step on a mesh.

Example (the paper's setting on 1024 ranks)::

    python -m longnet.plan --tokens 1G --ranks 1024 --heads 12 --head-dim 64 \\
        --dtype bfloat16 --first-w 2048 --first-r 1 --factor 2 --layers 12 --causal \\
        --tflops 400 --link-gbs 50
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from longnet.plan.cost import RunPlan, plan_run
from longnet.plan.documents import document_lengths
from longnet.plan.sweeps import fit_ranks, patterns_for, scaling_sweep
from longnet.plan.training import TrainingPlan, plan_training
from longnet.plan.units import DTYPE_BYTES, format_bytes, parse_count

__all__ = ["main"]


# ------------------------------------------------------------------- tables


def _compare_table(packed: RunPlan, single: RunPlan, every_rank: bool | None = None) -> str:
    """Per-rank traffic (forward + backward, sent + received) and FLOPs of a packed
    row against the same row as one sequence."""
    lines = [
        "the same row as one sequence (no documents), per layer: k/v bytes sent + "
        "received, forward + backward (what comm_stats() counts), and FLOPs",
        f"{'rank':>5} {'traffic docs':>13} {'no docs':>11} {'ratio':>7} "
        f"{'GFLOP docs':>11} {'no docs':>9}",
    ]
    pairs = list(zip(packed.per_rank, single.per_rank))
    if every_rank is None:
        every_rank = packed.ranks <= 16
    traffic = lambda c: c.bytes_sent + c.bytes_received  # noqa: E731
    if not every_rank:
        keep = {0, packed.ranks - 1}
        keep.add(max(range(len(pairs)), key=lambda p: traffic(pairs[p][0])))
        keep.add(max(range(len(pairs)), key=lambda p: traffic(pairs[p][0]) - traffic(pairs[p][1])))
        pairs = [pairs[p] for p in sorted(keep)]
    for a, b in pairs:
        t_a, t_b = traffic(a), traffic(b)
        ratio = f"{t_a / t_b:.3g}" if t_b else ("-" if not t_a else "inf")
        lines.append(
            f"{a.rank:>5} {format_bytes(t_a):>13} {format_bytes(t_b):>11} {ratio:>7} "
            f"{(a.flops_fwd + a.flops_bwd) / 1e9:>11.4g} "
            f"{(b.flops_fwd + b.flops_bwd) / 1e9:>9.4g}"
        )
    worst_a = max(traffic(c) for c in packed.per_rank)
    worst_b = max(traffic(c) for c in single.per_rank)
    more = [a.rank for a, b in zip(packed.per_rank, single.per_rank) if traffic(a) > traffic(b)]
    lines.append(
        f"worst rank: {format_bytes(worst_a)} with documents, {format_bytes(worst_b)} without"
        + (f" ({worst_a / worst_b:.3g}x)" if worst_b else "")
        + "; "
        + (
            "no rank exchanges more with documents (they cut the segments that cross ranks)"
            if not more
            else f"{len(more)} of {packed.ranks} ranks exchange more with documents (a "
            "document that starts off a segment boundary moves the segments of a short "
            "pattern onto a rank boundary; documents only shorten the long patterns' "
            "segments)"
        )
    )
    return "\n".join(lines)


def _sweep_table(rows: list[dict[str, Any]], timed: bool) -> str:
    """One line per rank count of a :func:`scaling_sweep`."""
    head = (
        f"{'N':>14} {'P':>5} {'patterns':>8} {'crossing':>8} {'sent MiB':>9} "
        f"{'recv MiB':>9} {'TFLOP':>8} {'act. GiB':>8}"
    )
    if timed:
        head += f" {'compute ms':>10} {'comm ms':>8} {'comm/comp':>9}"
    lines = [head]
    for r in rows:
        line = (
            f"{r['tokens']:>14,} {r['ranks']:>5} {r['patterns']:>8} "
            f"{r['crossing_patterns']:>8} {r['max_bytes_sent_fwd'] / 2**20:>9.2f} "
            f"{r['max_bytes_received_fwd'] / 2**20:>9.2f} "
            f"{(r['max_flops_fwd'] + r['max_flops_bwd']) / 1e12:>8.2f} "
            f"{r['max_activation_bytes'] / 2**30:>8.3f}"
        )
        if timed:
            line += (
                f" {1e3 * r['max_compute_s']:>10.2f} {1e3 * r['max_comm_s']:>8.3f} "
                f"{r['max_comm_to_compute']:>9.4f}"
            )
        lines.append(line)
    lines.append(
        "per layer, worst rank: k/v MiB sent and received forward (backward swaps "
        "them), TFLOP forward+backward, attention activations kept for backward"
        + ("; times forward+backward" if timed else "")
    )
    return "\n".join(lines)


# -------------------------------------------------------------------- plot


def _plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """The sweep's per-rank traffic, FLOPs and memory against N, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["tokens"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    _plot_traffic(axes[0], ns, rows)
    ax = axes[1]
    ax.plot(
        ns,
        [(r["max_flops_fwd"] + r["max_flops_bwd"]) / 1e12 for r in rows],
        "o-",
        label="fwd + bwd, worst rank",
    )
    ax.plot(ns, [r["max_flops_fwd"] / 1e12 for r in rows], "s--", label="fwd, worst rank")
    ax.set_ylabel("TFLOP per rank per layer")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="lower right")
    _plot_memory(axes[2], ns, rows)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"N (P = N / {rows[0]['tokens_per_rank']} ranks)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_traffic(ax, ns: list[int], rows: list[dict[str, Any]]) -> None:
    """Bytes sent per rank (worst and mean) and the rank-crossing patterns."""
    ax.plot(
        ns,
        [(r["max_bytes_sent_fwd"] + r["max_bytes_sent_bwd"]) / 2**20 for r in rows],
        "o-",
        label="sent, worst rank",
    )
    ax.plot(
        ns,
        [(r["mean_bytes_sent_fwd"] + r["mean_bytes_sent_bwd"]) / 2**20 for r in rows],
        "s--",
        label="sent, mean over ranks",
    )
    ax.set_ylabel("k/v MiB per rank per layer (fwd + bwd)")
    ax2 = ax.twinx()
    ax2.step(
        ns,
        [r["crossing_patterns"] for r in rows],
        where="mid",
        color="gray",
        alpha=0.5,
        label="rank-crossing patterns",
    )
    ax2.set_ylabel("rank-crossing patterns", color="gray")
    ax.legend(fontsize=8, loc="upper left")


def _plot_memory(ax, ns: list[int], rows: list[dict[str, Any]]) -> None:
    """Attention activations of the worst rank and, when timed, comm / compute."""
    ax.plot(
        ns,
        [r["max_activation_bytes"] / 2**30 for r in rows],
        "o-",
        label="attention activations, worst rank",
    )
    ax.set_ylabel("GiB per rank per layer")
    if rows[0].get("max_compute_s") is not None:
        ax3 = ax.twinx()
        ax3.plot(
            ns, [r["max_comm_to_compute"] for r in rows], "^:", color="C3", label="comm / compute"
        )
        ax3.set_ylabel("comm / compute time", color="C3")
        ax3.set_ylim(bottom=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="lower right")


# ------------------------------------------------------------------ arguments


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m longnet.plan",
        description="Plan a sequence-parallel LongNet run: per rank and per layer, the "
        "key/value bytes sent and received (forward and backward), the "
        "attention's activation memory, its FLOPs and, with --tflops and "
        "--link-gbs, compute and communication time. Nothing is run: it "
        "counts what longnet.parallel's planner would do.",
        epilog="Counts take binary suffixes: 64K, 1M, 1G (= 1B = 2^30). Example, the paper's "
        "setting on 1024 ranks: python -m longnet.plan --tokens 1G --ranks 1024 "
        "--heads 12 --head-dim 64 --first-w 2048 --factor 2 --layers 12 --causal "
        "--tflops 400 --link-gbs 50 --sweep",
    )
    p.add_argument("--tokens", required=True, help="sequence length N")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--ranks", help="sequence-parallel ranks P (default 1)")
    how.add_argument("--tokens-per-rank", help="tokens per rank L (P = N / L)")
    how.add_argument(
        "--fit-memory",
        type=float,
        metavar="GIB",
        help="pick the fewest ranks whose attention memory in a training "
        "step (all layers' activations and one layer's forward "
        "buffers) fits in this many GiB per device",
    )
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--heads", type=int, required=True, help="query heads H")
    p.add_argument("--kv-heads", type=int, help="key/value heads Hk (default H)")
    p.add_argument("--head-dim", type=int, required=True, help="head dim D")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--layers", type=int, default=1, help="layers (for the memory total)")
    p.add_argument("--causal", action="store_true")
    p.add_argument(
        "--position-offset",
        type=int,
        default=0,
        help="absolute position of the sequence's first token (default 0)",
    )
    _add_document_args(p)
    _add_pattern_args(p)
    _add_training_args(p)
    _add_output_args(p)
    return p


def _add_document_args(p: argparse.ArgumentParser) -> None:
    docs = p.add_argument_group(
        "packed documents (batch 1): the row holds documents back to back, each attended "
        "alone (segments restart at its first token, which sits at --position-offset), as "
        "sequence_parallel_dilated_attention with cu_seqlens; the output adds the same row "
        "without documents for comparison"
    )
    how_docs = docs.add_mutually_exclusive_group()
    how_docs.add_argument(
        "--doc-lengths",
        metavar="LIST",
        help="comma-separated document lengths (e.g. 4096,8192,1K), repeated in order "
        "until --tokens are filled (the last document is cut)",
    )
    how_docs.add_argument(
        "--doc-length-dist",
        metavar="SPEC",
        help="document lengths drawn until --tokens are filled: fixed:LEN, uniform:LO,HI "
        "or lognormal:MEAN,SIGMA (mean MEAN tokens, log-space deviation SIGMA)",
    )
    docs.add_argument(
        "--doc-seed", type=int, default=0, help="seed of --doc-length-dist's draws (0)"
    )


def _add_pattern_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("patterns: a list, or the geometric rule")
    g.add_argument("--segment-lengths", nargs="+", help="w_1 .. w_m")
    g.add_argument("--dilation-rates", nargs="+", help="r_1 .. r_m")
    g.add_argument("--first-w", help="geometric: first segment length")
    g.add_argument("--first-r", type=int, default=1, help="geometric: first rate (1)")
    g.add_argument(
        "--factor",
        type=int,
        default=2,
        help="geometric: w_{i+1} = factor * w_i up to the first w >= N (2)",
    )
    g.add_argument(
        "--r-factor",
        type=int,
        help="geometric: r_{i+1} = r-factor * r_i (default --factor: w/r fixed)",
    )


def _add_training_args(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group(
        "training on a (dp, sp) mesh (with --embed-dim: --ranks is sp, --batch the global "
        "batch, --layers the model's; adds FSDP2 memory, all activations and traffic)"
    )
    m.add_argument("--embed-dim", type=int, help="model width E (turns the training plan on)")
    m.add_argument("--ffn-dim", type=int, help="feed-forward width (default 4 E)")
    m.add_argument("--vocab-size", type=int, default=259, help="vocabulary (259)")
    m.add_argument("--dp", type=int, default=1, help="data-parallel degree (1)")
    m.add_argument("--activation-checkpointing", action="store_true")
    m.add_argument(
        "--chunk-size",
        type=int,
        help="feed-forward and LM head + loss over this many positions at a time "
        "(LongNetLM.set_chunk_size, train_lm.py --chunk-size; default off)",
    )


def _add_output_args(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("time (both needed)")
    t.add_argument("--tflops", type=float, help="TFLOP/s the attention sustains per device")
    t.add_argument("--link-gbs", type=float, help="GB/s per device for the all-to-alls")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the plan as JSON")
    o.add_argument("--per-rank", action="store_true", help="print every rank")
    o.add_argument(
        "--sweep",
        action="store_true",
        help="also plan P = 1, 2, 4, ... up to P with L fixed (N and P grow "
        "together; geometric patterns follow N)",
    )
    o.add_argument(
        "--plot",
        metavar="PATH",
        help="plot the sweep (per-rank traffic, FLOPs, memory) to PATH, its "
        "numbers to PATH with .json",
    )


# ------------------------------------------------------------------- planning


@dataclass
class _Planned:
    """What the command line planned from its arguments."""

    tokens: int
    ranks: int
    first_w: int | None
    ws: list[int]
    rs: list[int]
    plan: RunPlan
    rows: list[dict[str, Any]] | None = None  # the sweep
    unpacked: RunPlan | None = None  # the packed row without its documents
    training: TrainingPlan | None = None


def _patterns(args: argparse.Namespace, tokens: int) -> tuple[dict[str, Any], int | None]:
    """The pattern arguments of :func:`patterns_for` (lists or the geometric rule)
    and ``--first-w`` as a count."""
    ws = [parse_count(x) for x in args.segment_lengths] if args.segment_lengths else None
    rs = [parse_count(x) for x in args.dilation_rates] if args.dilation_rates else None
    first_w = parse_count(args.first_w) if args.first_w else None
    if first_w is None and ws is None:
        raise ValueError(
            "give the patterns: --segment-lengths with --dilation-rates, "
            "or --first-w (with --first-r, --factor) for geometric ones"
        )
    if (args.tflops is None) != (args.link_gbs is None):
        raise ValueError("--tflops and --link-gbs go together")
    pattern_kw = dict(
        segment_lengths=ws,
        dilation_rates=rs,
        first_w=first_w,
        first_r=args.first_r,
        w_factor=args.factor,
        r_factor=args.r_factor,
    )
    return pattern_kw, first_w


def _run_kwargs(args: argparse.Namespace, tokens: int, packed: bool) -> dict[str, Any]:
    """The keyword arguments of :func:`plan_run` besides the patterns and times."""
    kw: dict[str, Any] = dict(
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        batch=args.batch,
        layers=args.layers,
        causal=args.causal,
        position_offset=args.position_offset,
    )
    if packed:
        if args.sweep or args.plot or args.embed_dim is not None:
            raise ValueError(
                "--sweep, --plot and --embed-dim plan one sequence per row: not with "
                "--doc-lengths or --doc-length-dist"
            )
        if args.batch != 1:
            raise ValueError(f"packed documents need --batch 1, got {args.batch}")
        kw["doc_lengths"] = document_lengths(
            tokens,
            lengths=args.doc_lengths.split(",") if args.doc_lengths else None,
            distribution=args.doc_length_dist,
            seed=args.doc_seed,
        )
    return kw


def _ranks(
    args: argparse.Namespace, tokens: int, ws: list[int], rs: list[int], kw: dict[str, Any]
) -> int:
    """The rank count: ``--ranks``, ``N / --tokens-per-rank`` or the fewest that fit
    ``--fit-memory``."""
    if args.fit_memory is not None:
        return fit_ranks(
            tokens, args.fit_memory * 2**30, segment_lengths=ws, dilation_rates=rs, **kw
        )
    if args.tokens_per_rank is not None:
        per = parse_count(args.tokens_per_rank)
        if per < 1 or tokens % per:
            raise ValueError(f"--tokens-per-rank ({per}) must divide --tokens ({tokens})")
        return tokens // per
    return parse_count(args.ranks) if args.ranks is not None else 1


def _sweep(
    args: argparse.Namespace,
    tokens: int,
    ranks: int,
    pattern_kw: dict[str, Any],
    kw: dict[str, Any],
) -> list[dict[str, Any]]:
    """The sweep P = 1, 2, 4, ... up to ``ranks`` with the tokens per rank fixed."""
    counts = [1 << e for e in range(ranks.bit_length()) if (1 << e) < ranks] + [ranks]
    counts = [c for c in counts if tokens // ranks * c > 0]
    sweep_kw = dict(kw)
    del sweep_kw["heads"], sweep_kw["head_dim"]
    return scaling_sweep(
        tokens // ranks,
        counts,
        heads=args.heads,
        head_dim=args.head_dim,
        tflops=args.tflops,
        link_gbs=args.link_gbs,
        **pattern_kw,
        **sweep_kw,
    )


def _training(
    args: argparse.Namespace, tokens: int, ranks: int, ws: list[int], rs: list[int]
) -> TrainingPlan:
    """The training plan of ``--embed-dim``'s model on the ``(--dp, ranks)`` mesh."""
    from longnet.model import LongNetConfig

    cfg = LongNetConfig(
        vocab_size=args.vocab_size,
        num_layers=args.layers,
        embed_dim=args.embed_dim,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        ffn_dim=args.ffn_dim,
        segment_lengths=ws,
        dilation_rates=rs,
    )
    if cfg.head_dim != args.head_dim:
        raise ValueError(
            f"--embed-dim / --heads = {cfg.head_dim} but --head-dim is {args.head_dim}"
        )
    return plan_training(
        cfg,
        batch=args.batch * args.dp,
        seq_len=tokens,
        dp=args.dp,
        sp=ranks,
        dtype=args.dtype,
        activation_checkpointing=args.activation_checkpointing,
        position_offset=args.position_offset,
        chunk_size=args.chunk_size,
    )


def _plan(args: argparse.Namespace) -> _Planned:
    """Everything the arguments ask for; a ValueError names the argument at fault."""
    tokens = parse_count(args.tokens)
    pattern_kw, first_w = _patterns(args, tokens)
    ws, rs = patterns_for(tokens, **pattern_kw)
    packed = args.doc_lengths is not None or args.doc_length_dist is not None
    kw = _run_kwargs(args, tokens, packed)
    ranks = _ranks(args, tokens, ws, rs, kw)
    run_kw = dict(segment_lengths=ws, dilation_rates=rs, tflops=args.tflops, link_gbs=args.link_gbs)
    out = _Planned(tokens, ranks, first_w, ws, rs, plan_run(tokens, ranks, **run_kw, **kw))
    if args.sweep or args.plot:
        out.rows = _sweep(args, tokens, ranks, pattern_kw, kw)
    if packed:
        out.unpacked = plan_run(
            tokens, ranks, **run_kw, **{k: v for k, v in kw.items() if k != "doc_lengths"}
        )
    if args.embed_dim is not None:
        out.training = _training(args, tokens, ranks, ws, rs)
    return out


# --------------------------------------------------------------------- output


def _print_json(run: _Planned) -> None:
    out = run.plan.to_dict()
    if run.rows is not None:
        out["sweep"] = run.rows
    if run.training is not None:
        out["training"] = run.training.to_dict()
    if run.unpacked is not None:
        out["without_documents"] = run.unpacked.to_dict()
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


def _print_tables(args: argparse.Namespace, run: _Planned) -> None:
    every_rank = True if args.per_rank else None
    if args.fit_memory is not None:
        print(
            f"fewest ranks within {args.fit_memory:g} GiB of attention memory per "
            f"device: {run.ranks}"
        )
    print(run.plan.table(every_rank=every_rank))
    if run.unpacked is not None:
        print("\n" + _compare_table(run.plan, run.unpacked, every_rank=every_rank))
    if run.rows is not None:
        print(
            f"\nN and P grow together (L = {run.tokens // run.ranks:,} tokens per rank"
            + (", patterns geometric in N" if args.first_w else ", patterns fixed")
            + "):"
        )
        print(_sweep_table(run.rows, args.tflops is not None))
    if run.training is not None:
        print("\ntraining step:")
        print(run.training.table())


def _save_plot(
    args: argparse.Namespace, run: _Planned, rows: list[dict[str, Any]], argv: Sequence[str] | None
) -> None:
    """The sweep's plot at ``--plot`` and its rows, with the command, next to it."""
    title = (
        f"longnet.plan: L = {run.tokens // run.ranks:,} tokens per rank, H = {args.heads}, "
        f"Hk = {args.kv_heads or args.heads}, D = {args.head_dim}, {args.dtype}, "
        f"{'causal' if args.causal else 'not causal'}, "
        + (
            f"w_0 = {run.first_w}, r_0 = {args.first_r}, factor {args.factor}"
            if run.first_w
            else f"w = {run.ws}, r = {run.rs}"
        )
    )
    _plot(rows, args.plot, title)
    stem = os.path.splitext(args.plot)[0]
    with open(stem + ".json", "w") as f:
        json.dump(
            {
                "command": "python -m longnet.plan "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                "rows": rows,
            },
            f,
            indent=1,
        )
    if not args.json:
        print(f"saved {args.plot} and {stem}.json")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); 0 on success, a
    usage error (exit 2) naming the argument at fault otherwise."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        run = _plan(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.json:
        _print_json(run)
    else:
        _print_tables(args, run)
    if args.plot and run.rows is not None:  # --plot always runs the sweep
        _save_plot(args, run, run.rows, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
