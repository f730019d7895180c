#!/usr/bin/env python3
"""Long-range retrieval: does dilated attention reach facts far away?

A synthetic multi-query retrieval task. Every sequence of ``N`` tokens is filler in
which ``--pairs`` facts "key k holds value v" are written at random places, each fact
queried once later on; the model must answer every query with the value its key holds
in this sequence. The distance from a fact to its query is drawn so that every
distance bucket (``[0, w0)``, ``[w0, 2 w0)``, ``[2 w0, 4 w0)``, ... up to ``N``, ``w0``
the smallest segment length) gets about as many queries. Only the answer tokens carry
a loss; a query counts as correct when the arg-max over the whole vocabulary is its
answer (exact match). Chance is ``1 / --values``: the query names the key, so a model
that cannot see the fact can still pick among that key's values, but only by guessing.

Token layout, ``--fact joint`` (the default): a fact is one token ``F(k, v)``
(``--keys * --values`` such tokens), a query is ``Q(k)``, and its answer is ``F(k, v)``
itself (the next token). One attention layer solves it: ``Q(k)`` attends to the
token of key ``k`` and copies it. ``--fact pair`` is classic associative recall: a
fact is the two tokens ``K(k) A(v)``, a query is ``K(k)`` and its answer ``A(v)``; it
needs a previous-token step before the lookup (two layers) and learns far more slowly.

Facts and queries sit on positions that are multiples of the largest dilation rate
``r_max`` (for ``pair``, the value token does). In dilated attention head ``j`` of
pattern ``(w, r)`` keeps, in each segment, the positions ``= j mod r``, so head 0 of
every pattern sees all these positions, and one layer links a fact to a later query
through the smallest pattern whose segment holds both. Between unaligned positions the
information would have to hop through several layers; this benchmark measures the
reach of the patterns, not that.

Models (the project's ``LongNetLM``, same width, depth, data, steps, batch and
sequence length for all):

* ``dilated``: segment lengths ``w0 * 2^i`` and dilation rates ``2^i`` up to the
  sequence length (``w0 = --w0``).
* ``local``: block-local attention, one pattern ``(w, 1)`` whose FLOPs equal the
  dilated model's: ``w = sum_i w_i / r_i^2`` (per pattern ``4 N H D w / r^2``, halved
  causal). A query sees only its own block.
* ``dense``: one pattern ``(N, 1)``, full causal attention; only for sequence lengths
  up to ``--dense-max-len`` (its cost grows with ``N^2``).

Defaults: one layer, width 64, 2 heads, no position encoding, float32, AdamW at
0.01, 300 steps of 16,384 tokens per model; the whole run (2K and 8K, all three
models) took about 10 minutes on a 2-core CPU. Prints accuracy by distance bucket,
writes ``long_range.json`` and ``long_range.png`` under ``--out-dir``.

    python benchmarks/long_range.py                          # defaults: 2K and 8K, CPU
    python benchmarks/long_range.py --device cuda --seq-lens 8192,32768 \\
        --embed-dim 128 --steps 1000 --batch-size 8 --dense-max-len 32768
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

# Idle OpenMP threads sleep instead of spinning (see examples/train_lm.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:
    import longnet  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from longnet.cli import int_list  # noqa: E402
from longnet.model import LongNetConfig, LongNetLM  # noqa: E402

VARIANTS = ("dilated", "local", "dense")
IGNORE = -100


# --------------------------------------------------------------------------- task


@dataclass(frozen=True)
class TaskSpec:
    """Shape of the retrieval task.

    Attributes:
        seq_len: tokens per sequence.
        stride: facts and queries sit on multiples of ``stride`` (the largest dilation
            rate of the dilated model).
        pairs: facts (and queries) per sequence.
        keys: distinct keys; each sequence uses ``pairs`` of them, without repeats.
        values: distinct values (chance accuracy is ``1 / values``).
        fillers: distinct filler tokens.
        bucket_unit: width of the first distance bucket (the smallest segment length).
        fact: ``"joint"`` (one token per fact) or ``"pair"`` (key token, value token).
    """

    seq_len: int
    stride: int
    pairs: int = 64
    keys: int = 64
    values: int = 8
    fillers: int = 1
    bucket_unit: int = 256
    fact: str = "joint"

    def __post_init__(self) -> None:
        if self.fact not in ("joint", "pair"):
            raise ValueError(f"fact must be 'joint' or 'pair', got {self.fact!r}")
        min_stride = 2 if self.fact == "joint" else 4  # room for the answer (and K(k))
        if self.stride < min_stride:
            raise ValueError(
                f"stride must be >= {min_stride} for fact={self.fact!r}, got {self.stride}"
            )
        if self.pairs > self.keys:
            raise ValueError(f"pairs ({self.pairs}) must be <= keys ({self.keys})")
        slots = (self.seq_len - 1) // self.stride  # aligned positions >= stride, < seq_len - 1
        if 2 * self.pairs > slots:
            raise ValueError(
                f"{self.pairs} pairs need {2 * self.pairs} aligned positions, "
                f"seq_len {self.seq_len} / stride {self.stride} has {slots}"
            )
        if self.bucket_unit < self.stride or self.bucket_unit >= self.seq_len:
            raise ValueError(f"bucket_unit ({self.bucket_unit}) must be in [stride, seq_len)")

    # Vocabulary. joint: fillers | F(k, v) | Q(k); the answer is F(k, v) itself.
    #             pair:  fillers | K(k) | A(v); the answer is A(v).
    @property
    def fact_base(self) -> int:
        return self.fillers

    @property
    def query_base(self) -> int:
        return self.fact_base + (self.keys * self.values if self.fact == "joint" else 0)

    @property
    def value_base(self) -> int:
        return self.query_base + self.keys

    @property
    def vocab_size(self) -> int:
        return self.value_base + (self.values if self.fact == "pair" else 0)

    def fact_token(self, key: int, value: int) -> int:
        """Id of the joint fact token ``F(key, value)`` (``fact="joint"``)."""
        if self.fact != "joint":
            raise ValueError("fact tokens exist only with fact='joint'")
        return self.fact_base + key * self.values + value

    def query_token(self, key: int) -> int:
        """Id of ``Q(key)`` (joint) or ``K(key)`` (pair)."""
        return self.query_base + key

    def value_token(self, value: int) -> int:
        """Id of the value token ``A(value)`` (``fact="pair"``)."""
        if self.fact != "pair":
            raise ValueError("value tokens exist only with fact='pair'")
        return self.value_base + value

    def answer_token(self, key: int, value: int) -> int:
        """The token that answers the query for ``key`` whose fact holds ``value``."""
        return self.fact_token(key, value) if self.fact == "joint" else self.value_token(value)

    def bucket_edges(self) -> list[int]:
        """Distance bucket edges ``[0, u, 2u, 4u, ..., seq_len]`` (``u = bucket_unit``)."""
        edges, e = [0], self.bucket_unit
        while e < self.seq_len:
            edges.append(e)
            e *= 2
        edges.append(self.seq_len)
        return edges


@dataclass
class Batch:
    """A batch of retrieval sequences.

    ``ids`` ``(B, N)``; ``targets`` ``(B, N)`` holds, at every query position, the id of
    the answer token that follows it and ``-100`` elsewhere; ``distance`` ``(B, N)`` is
    query position minus fact position there (``-1`` elsewhere); ``fact_pos`` the
    position of the fact's value-carrying token (``-1`` elsewhere).
    """

    ids: torch.Tensor
    targets: torch.Tensor
    distance: torch.Tensor
    fact_pos: torch.Tensor


def _sample_distance(spec: TaskSpec, gen: torch.Generator) -> int:
    """A multiple of ``stride`` drawn uniformly from a uniformly drawn bucket."""
    edges = spec.bucket_edges()
    b = int(torch.randint(len(edges) - 1, (1,), generator=gen))
    lo = max(edges[b], spec.stride)
    hi = min(edges[b + 1], spec.seq_len - 1 - spec.stride)  # exclusive
    lo_k, hi_k = -(-lo // spec.stride), (hi - 1) // spec.stride
    if hi_k < lo_k:
        return -1
    return spec.stride * int(torch.randint(lo_k, hi_k + 1, (1,), generator=gen))


def make_batch(spec: TaskSpec, batch_size: int, gen: torch.Generator) -> Batch:
    """Draw ``batch_size`` sequences of the task (reproducible with ``gen``)."""
    n, s = spec.seq_len, spec.stride
    ids = torch.randint(spec.fillers, (batch_size, n), generator=gen)
    targets = torch.full((batch_size, n), IGNORE, dtype=torch.long)
    distance = torch.full((batch_size, n), -1, dtype=torch.long)
    fact_pos = torch.full((batch_size, n), -1, dtype=torch.long)
    last_slot = (n - 2) // s  # query at slot*s needs its answer at slot*s + 1 < n
    for b in range(batch_size):
        keys = torch.randperm(spec.keys, generator=gen)[: spec.pairs].tolist()
        values = torch.randint(spec.values, (spec.pairs,), generator=gen).tolist()
        used = set()
        for key, value in zip(keys, values):
            for _ in range(1000):
                d = _sample_distance(spec, gen)
                if d < 0:
                    continue
                q_slot = int(torch.randint(1 + d // s, last_slot + 1, (1,), generator=gen))
                f_slot = q_slot - d // s
                if spec.fact == "pair" and (f_slot * s) % spec.bucket_unit == 0:
                    continue  # keep K(k) in the same smallest segment as A(v)
                if q_slot not in used and f_slot not in used:
                    break
            else:
                raise RuntimeError("could not place a fact; use fewer pairs or a longer sequence")
            used.update((q_slot, f_slot))
            q, f = q_slot * s, f_slot * s
            answer = spec.answer_token(key, value)
            if spec.fact == "pair":
                ids[b, f - 1] = spec.query_token(key)
            ids[b, f] = answer
            ids[b, q] = spec.query_token(key)
            ids[b, q + 1] = answer
            targets[b, q] = answer
            distance[b, q] = q - f
            fact_pos[b, q] = f
    return Batch(ids, targets, distance, fact_pos)


# --------------------------------------------------------------------- evaluation


def exact_match(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-query correctness: arg-max of ``logits`` ``(M, V)`` equals ``targets`` ``(M,)``."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"logits (M, V) and targets (M,) expected, got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    return logits.argmax(dim=-1) == targets


def accuracy_by_bucket(
    correct: torch.Tensor, distance: torch.Tensor, edges: Sequence[int]
) -> list[tuple[int, float]]:
    """``[(count, accuracy)]`` for each bucket ``edges[i] <= distance < edges[i + 1]``.

    An empty bucket has accuracy ``nan``.
    """
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (distance >= lo) & (distance < hi)
        count = int(sel.sum())
        acc = float(correct[sel].float().mean()) if count else float("nan")
        out.append((count, acc))
    return out


def answer_logits(model: LongNetLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits ``(M, V)`` of ``model`` at the positions where ``mask`` is true.

    The same computation as ``LongNetLM.forward`` (embedding, decoder, tied or separate
    head) but the head runs on the answer positions only.
    """
    x = model.decoder(model.embed_tokens(ids))
    weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    return F.linear(x[mask], weight).float()


@torch.no_grad()
def evaluate(
    model: LongNetLM, batches: Sequence[Batch], edges: Sequence[int], device: str
) -> dict[str, Any]:
    """Exact-match accuracy of ``model`` overall and per distance bucket."""
    model.eval()
    corrects, dists = [], []
    for batch in batches:
        mask = batch.targets != IGNORE
        logits = answer_logits(model, batch.ids.to(device), mask.to(device))
        corrects.append(exact_match(logits.cpu(), batch.targets[mask]))
        dists.append(batch.distance[mask])
    model.train()
    correct, dist = torch.cat(corrects), torch.cat(dists)
    return {
        "accuracy": float(correct.float().mean()),
        "buckets": accuracy_by_bucket(correct, dist, edges),
    }


# ------------------------------------------------------------------------ models


def dilated_patterns(seq_len: int, w0: int) -> tuple[list[int], list[int]]:
    """``w = w0 * 2^i``, ``r = 2^i`` for ``i = 0 ..`` while ``w <= seq_len``."""
    if w0 < 1 or w0 > seq_len:
        raise ValueError(f"w0 must be in [1, seq_len], got {w0}")
    ws, rs = [], []
    w, r = w0, 1
    while w <= seq_len:
        ws.append(w)
        rs.append(r)
        w, r = 2 * w, 2 * r
    return ws, rs


def attention_cost(seq_len: int, ws: Sequence[int], rs: Sequence[int]) -> float:
    """Causal attention FLOPs per head dimension: ``sum_i 2 N min(w_i, N) / r_i^2``."""
    return sum(2.0 * seq_len * min(w, seq_len) / (r * r) for w, r in zip(ws, rs))


def local_window(seq_len: int, ws: Sequence[int], rs: Sequence[int]) -> int:
    """Block size of the block-local pattern with the FLOPs of ``(ws, rs)``."""
    return max(1, round(sum(min(w, seq_len) / (r * r) for w, r in zip(ws, rs))))


def variant_patterns(variant: str, seq_len: int, w0: int) -> tuple[list[int], list[int]]:
    """``(segment_lengths, dilation_rates)`` of ``variant`` at ``seq_len``."""
    ws, rs = dilated_patterns(seq_len, w0)
    if variant == "dilated":
        return ws, rs
    if variant == "local":
        return [local_window(seq_len, ws, rs)], [1]
    if variant == "dense":
        return [seq_len], [1]
    raise ValueError(f"unknown variant {variant!r}, expected one of {VARIANTS}")


def build_model(args: argparse.Namespace, spec: TaskSpec, variant: str) -> LongNetLM:
    ws, rs = variant_patterns(variant, spec.seq_len, args.w0)
    cfg = LongNetConfig(
        vocab_size=spec.vocab_size,
        num_layers=args.layers,
        embed_dim=args.embed_dim,
        num_heads=args.heads,
        segment_lengths=ws,
        dilation_rates=rs,
        position_encoding=None if args.position_encoding == "none" else args.position_encoding,
        rope_base=args.rope_base,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    return LongNetLM(cfg, device=args.device)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to ``lr / 10``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_and_evaluate(
    args: argparse.Namespace, spec: TaskSpec, variant: str, eval_set: Sequence[Batch]
) -> dict[str, Any]:
    """Train one model on fresh batches of ``spec`` and evaluate it on ``eval_set``."""
    torch.manual_seed(args.seed)
    model = build_model(args, spec, variant)
    cfg = model.config
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed + 1)  # same training data for every variant
    edges = spec.bucket_edges()
    warmup = max(1, args.steps // 10)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(
            total=args.steps,
            desc=f"{variant} N={spec.seq_len}",
            unit="step",
            dynamic_ncols=True,
            file=sys.stdout,
        )
    t0 = time.time()
    history = []
    model.train()
    for step in range(args.steps):
        batch = make_batch(spec, args.batch_size, gen)
        mask = batch.targets != IGNORE
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup)
        logits = answer_logits(model, batch.ids.to(args.device), mask.to(args.device))
        target = batch.targets[mask].to(args.device)
        loss = F.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise SystemExit(f"{variant} N={spec.seq_len}: training diverged at step {step}")
        acc = float(exact_match(logits.detach(), target).float().mean())
        history.append((step + 1, round(value, 4), round(acc, 4)))
        if bar is not None:
            bar.set_postfix(loss=f"{value:.3f}", acc=f"{acc:.2f}")
            bar.update(1)
        if args.log_every and (step + 1) % args.log_every == 0:
            recent = history[-args.log_every :]
            msg = (
                f"{variant} N={spec.seq_len} step {step + 1}: loss "
                f"{sum(h[1] for h in recent) / len(recent):.3f}, train accuracy "
                f"{sum(h[2] for h in recent) / len(recent):.3f}"
            )
            if bar is not None:
                bar.write(msg)
            else:
                print(msg, flush=True)
    train_s = time.time() - t0
    if bar is not None:
        bar.close()
    t1 = time.time()
    result = evaluate(model, eval_set, edges, args.device)
    result.update(
        variant=variant,
        seq_len=spec.seq_len,
        segment_lengths=cfg.segment_lengths,
        dilation_rates=cfg.dilation_rates,
        parameters=model.num_parameters(),
        attention_flops_per_head_dim=attention_cost(
            spec.seq_len, cfg.segment_lengths, cfg.dilation_rates
        ),
        train_s=round(train_s, 1),
        eval_s=round(time.time() - t1, 1),
        s_per_step=round(train_s / max(1, args.steps), 3),
        history=history,
    )
    return result


def time_steps(args: argparse.Namespace, spec: TaskSpec, variant: str, steps: int) -> float | None:
    """Seconds per training step of ``variant``, timed over ``steps`` steps after one
    warm-up step (None when ``steps`` is 0). Used for models too slow to train here."""
    if steps <= 0:
        return None
    torch.manual_seed(args.seed)
    model = build_model(args, spec, variant)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    batch = make_batch(spec, args.batch_size, gen)
    mask = batch.targets != IGNORE
    ids, m, target = (
        batch.ids.to(args.device),
        mask.to(args.device),
        batch.targets[mask].to(args.device),
    )
    t0 = 0.0
    for i in range(steps + 1):
        if i == 1:
            t0 = time.time()
        loss = F.cross_entropy(answer_logits(model, ids, m), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.time() - t0) / steps


# ------------------------------------------------------------------------- report


def bucket_label(lo: int, hi: int) -> str:
    def k(x: int) -> str:
        return f"{x // 1024}K" if x >= 1024 and x % 1024 == 0 else str(x)

    return f"{k(lo)}-{k(hi)}"


def format_table(
    results: list[dict[str, Any]],
    edges_by_len: dict[int, list[int]],
    chance: float,
    skipped: Sequence[dict[str, Any]] = (),
) -> str:
    """Markdown table: one row per (sequence length, variant), accuracy per bucket.

    Models in ``skipped`` (not trained) get a note under their length's table.
    """
    lines = []
    for n, edges in edges_by_len.items():
        rows = [r for r in results if r["seq_len"] == n]
        if not rows:
            continue
        labels = [bucket_label(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]
        lines.append(f"N = {n} (accuracy by fact-to-query distance; chance {chance:.3f})")
        lines.append("")
        lines.append(
            "| attention | patterns (w / r) | " + " | ".join(labels) + " | all | train s |"
        )
        lines.append("|---|---|" + "---:|" * (len(labels) + 2))
        for r in rows:
            pat = (
                ",".join(map(str, r["segment_lengths"]))
                + " / "
                + ",".join(map(str, r["dilation_rates"]))
            )
            cells = [f"{acc:.3f}" if count else "-" for count, acc in r["buckets"]]
            lines.append(
                f"| {r['variant']} | {pat} | "
                + " | ".join(cells)
                + f" | {r['accuracy']:.3f} | {r['train_s']:.0f} |"
            )
        for sk in skipped:
            if sk["seq_len"] == n:
                note = f"{sk['variant']}: not trained at N = {n}"
                if sk.get("s_per_step") is not None:
                    note += (
                        f" (measured {sk['s_per_step']:.2f} s per training step, "
                        f"about {sk['projected_train_s']:.0f} s for the same budget)"
                    )
                lines.append("")
                lines.append(note)
        lines.append("")
    return "\n".join(lines)


def save_plot(
    results: list[dict[str, Any]],
    edges_by_len: dict[int, list[int]],
    chance: float,
    w0: int,
    path: str,
) -> bool:
    """Accuracy against distance, one panel per sequence length (False without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lens = [n for n in edges_by_len if any(r["seq_len"] == n for r in results)]
    fig, axes = plt.subplots(1, len(lens), figsize=(5.2 * len(lens), 3.8), squeeze=False)
    styles = {"dilated": "o-", "local": "s--", "dense": "^:"}
    for ax, n in zip(axes[0], lens):
        edges = edges_by_len[n]
        centers = [
            math.sqrt(max(lo, 1) * hi) if lo else hi / 2 for lo, hi in zip(edges[:-1], edges[1:])
        ]
        for r in (r for r in results if r["seq_len"] == n):
            accs = [acc for _, acc in r["buckets"]]
            ax.plot(centers, accs, styles.get(r["variant"], "o-"), label=r["variant"])
        ax.axhline(chance, color="gray", lw=0.8, ls="--", label="chance")
        ax.axvline(4 * w0, color="gray", lw=0.8, ls=":", label=f"4 x w0 = {4 * w0}")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("fact-to-query distance (tokens)")
        ax.set_ylabel("exact-match accuracy")
        ax.set_title(f"N = {n}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left")
    fig.suptitle("long-range retrieval: same model, data and budget per N", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--seq-lens",
        type=int_list,
        default=[2048, 8192],
        help="sequence lengths to test (default: 2048,8192)",
    )
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}"
    )
    p.add_argument(
        "--dense-max-len",
        type=int,
        default=8192,
        help="train dense attention only up to this length; longer ones only get "
        "their step time measured (default: 8192)",
    )
    p.add_argument(
        "--w0",
        type=int,
        default=256,
        help="smallest segment length; also the first distance bucket (default: 256)",
    )
    p.add_argument(
        "--fact",
        choices=("joint", "pair"),
        default="joint",
        help="one token per fact, or key token + value token (default: joint)",
    )
    p.add_argument("--pairs", type=int, default=64, help="facts per sequence (default: 64)")
    p.add_argument("--keys", type=int, default=64, help="distinct keys (default: 64)")
    p.add_argument(
        "--values",
        type=int,
        default=8,
        help="distinct values per key; chance is 1/values (default: 8)",
    )
    p.add_argument("--fillers", type=int, default=1, help="distinct filler tokens (default: 1)")
    p.add_argument(
        "--steps",
        type=int_list,
        default=None,
        help="training steps, one number or one per sequence length (default: 300 at every length)",
    )
    p.add_argument(
        "--batch-size",
        type=int_list,
        default=None,
        help="sequences per step, one or one per length (default: 16384 tokens "
        "per step, i.e. 8 x 2K, 2 x 8K)",
    )
    p.add_argument(
        "--probe-steps",
        type=int,
        default=2,
        help="time this many training steps of a skipped dense model (0: none)",
    )
    p.add_argument(
        "--tokens-per-step",
        type=int,
        default=16384,
        help="batch size in tokens when --batch-size is not given (default: 16384)",
    )
    p.add_argument(
        "--eval-sequences",
        type=int,
        default=None,
        help="held-out sequences per length (default: 131072 tokens' worth)",
    )
    p.add_argument("--layers", type=int, default=1, help="decoder layers (default: 1)")
    p.add_argument("--embed-dim", type=int, default=64, help="model width (default: 64)")
    p.add_argument("--heads", type=int, default=2, help="attention heads (default: 2)")
    p.add_argument(
        "--position-encoding",
        choices=("rotary", "xpos", "none"),
        default="none",
        help="none by default: retrieval matches content at any distance",
    )
    p.add_argument(
        "--rope-base",
        type=float,
        default=10000.0,
        help="rotary base (a large base keeps slow rotary dimensions usable for "
        "content matching across the whole sequence)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=1e-2,
        help="AdamW peak learning rate, warm-up then cosine (default: 0.01)",
    )
    p.add_argument("--weight-decay", type=float, default=0.0, help="(default: 0)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="model, training-data and evaluation-data seed (default: 0)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--out-dir",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
        help="where long_range.json and long_range.png go (default: benchmarks/results)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--log-every",
        type=int,
        default=0,
        help="print the mean training loss and accuracy every this many steps",
    )
    return p


def _per_length(values: list[int] | None, lens: list[int], default) -> list[int]:
    if values is None:
        return [default(n) for n in lens]
    if len(values) == 1:
        return values * len(lens)
    if len(values) != len(lens):
        raise SystemExit(f"expected 1 or {len(lens)} values, got {values}")
    return values


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {v!r}, expected some of {VARIANTS}")
    lens = args.seq_lens
    steps = _per_length(args.steps, lens, lambda n: 300)
    batches = _per_length(args.batch_size, lens, lambda n: max(1, args.tokens_per_step // n))
    t_start = time.time()
    results: list[dict[str, Any]] = []
    edges_by_len: dict[int, list[int]] = {}
    specs: dict[int, dict[str, Any]] = {}
    skipped: list[dict[str, Any]] = []
    for n, n_steps, bs in zip(lens, steps, batches):
        _, rs = dilated_patterns(n, args.w0)
        spec = TaskSpec(
            seq_len=n,
            stride=rs[-1],
            pairs=args.pairs,
            keys=args.keys,
            values=args.values,
            fillers=args.fillers,
            bucket_unit=args.w0,
            fact=args.fact,
        )
        edges_by_len[n] = spec.bucket_edges()
        specs[n] = {"task": asdict(spec), "steps": n_steps, "batch_size": bs}
        n_eval = args.eval_sequences or max(1, 131072 // n)
        eval_gen = torch.Generator().manual_seed(10_000 + args.seed)
        eval_set = [make_batch(spec, min(bs, n_eval - i), eval_gen) for i in range(0, n_eval, bs)]
        run_args = argparse.Namespace(**{**vars(args), "steps": n_steps, "batch_size": bs})
        for variant in variants:
            if variant == "dense" and n > args.dense_max_len:
                probe = time_steps(run_args, spec, variant, args.probe_steps)
                skipped.append(
                    {
                        "variant": variant,
                        "seq_len": n,
                        "s_per_step": probe,
                        "projected_train_s": None if probe is None else round(probe * n_steps, 1),
                    }
                )
                print(
                    f"dense N={n}: skipped (--dense-max-len {args.dense_max_len})"
                    + (
                        ""
                        if probe is None
                        else f"; measured {probe:.2f} s/step, {probe * n_steps:.0f} s for "
                        f"{n_steps} steps"
                    ),
                    flush=True,
                )
                continue
            r = train_and_evaluate(run_args, spec, variant, eval_set)
            results.append(r)
            print(
                f"{variant} N={n}: accuracy {r['accuracy']:.3f} "
                f"({r['train_s']:.0f} s train, {r['eval_s']:.0f} s eval)",
                flush=True,
            )
    total_s = time.time() - t_start
    chance = 1.0 / args.values
    table = format_table(results, edges_by_len, chance, skipped)
    print()
    print(table)
    print(f"total {total_s:.0f} s")
    os.makedirs(args.out_dir, exist_ok=True)
    summary = {
        "args": vars(args),
        "lengths": specs,
        "chance": chance,
        "total_s": round(total_s, 1),
        "results": results,
        "skipped": skipped,
    }
    with open(os.path.join(args.out_dir, "long_range.json"), "w") as f:
        json.dump(summary, f, indent=1)
    png = os.path.join(args.out_dir, "long_range.png")
    if save_plot(results, edges_by_len, chance, args.w0, png):
        print(f"plot: {png}")
    else:
        print("matplotlib is not installed: no plot written")
    return summary


if __name__ == "__main__":
    main()
