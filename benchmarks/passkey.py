#!/usr/bin/env python3
"""Passkey retrieval past the trained context: does a token find one fact far back?

The prompt is the one of Landmark attention and LongLoRA: an instruction, filler
sentences, at a chosen depth ``The pass key is K. Remember it. K is the pass key.``,
more filler, then ``What is the pass key? The pass key is``. ``K`` is a random
5-digit number, drawn per (length, depth, trial) from ``--seed`` and the same for every
variant. A trial succeeds when greedy decoding continues the prompt with exactly the
tokens of `` K``. That is computed in one forward pass over prompt + answer (teacher
forcing): greedy decoding emits the answer exactly when the argmax at every answer
position is the next answer token, so the two are the same test, and the forward pass
needs no cache. Only the answer positions go through the vocabulary projection.

Depths are fractions of the filler placed before the needle (0 = right after the
instruction, 1 = right before the question). Lengths count prompt + answer tokens
(filler repeats a whole number of times: up to one filler sentence group shorter).

Variants (``--variants``), all on SmolLM2-135M-Instruct (trained to 8,192 tokens):

* ``sdpa``: dense attention, RoPE as trained;
* ``local``: block-local attention, one pattern ``(--local-window, 1)`` (a prompt that
  fits one block is dense attention: the row is sdpa's, marked ``= sdpa``);
* ``dilated``: the long-context patterns and RoPE scaling, zero-shot;
* ``dilated-ft``: the same with the fine-tuned adapter (``--adapter``);
* ``sdpa-ft``: dense attention with the same RoPE scaling and adapter (the dense
  quality anchor at quadratic cost).

Each cell's accuracy, the wall time and tokens/s of each row are written after every
row to ``--out-dir``/passkey.{json,md,png} (the PNG is one heatmap per variant:
length x depth, share of keys found).

    python benchmarks/passkey.py                                   # the default run
    python benchmarks/passkey.py --lengths 2048 --depths 0,0.5,1 --variants sdpa,local
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Idle OpenMP threads sleep instead of spinning (shared CPUs). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import longnet  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from common import machine_info, markdown_table, save_results  # noqa: E402  (benchmarks/common.py)

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and "
    "memorize it. I will quiz you about the important information there."
)
FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class Trial:
    """One prompt: ``ids`` holds prompt + answer; the answer is its last ``answer_len``
    tokens; the needle starts at token ``needle_at``."""

    length: int
    depth: float
    key: int
    shift: int
    ids: torch.Tensor
    answer_len: int
    needle_at: int


def make_trial(tokenizer, length: int, depth: float, key: int, shift: int = 0) -> Trial:
    """The passkey prompt of at most ``length`` tokens (prompt + answer) with the
    needle after ``round(depth * n)`` of the ``n`` filler groups, followed by
    ``shift`` extra space tokens (moves the needle against the question by ``shift``
    positions)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: expected a fraction in [0, 1], got {depth}")

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    head, filler = enc(INSTRUCTION), enc(FILLER)
    needle, question, answer = enc(NEEDLE.format(key=key)), enc(QUESTION), enc(f" {key}")
    space = enc(" ")
    fixed = len(head) + len(needle) + len(question) + len(answer) + shift * len(space)
    n_fill = (length - fixed) // len(filler)
    if n_fill < 1:
        raise ValueError(f"length: {length} tokens cannot hold the prompt ({fixed} + filler)")
    before = round(depth * n_fill)
    after = space * shift + filler * (n_fill - before)
    ids = head + filler * before + needle + after + question + answer
    return Trial(
        length=length,
        depth=depth,
        key=key,
        shift=shift,
        ids=torch.tensor(ids, dtype=torch.long),
        answer_len=len(answer),
        needle_at=len(head) + len(filler) * before,
    )


def make_trials(
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    keys: int,
    seed: int,
    shifts: Sequence[int] = (0,),
) -> list[Trial]:
    """``keys`` trials per (length, depth, shift); the keys come from one generator
    seeded with ``seed``, so every variant sees the same prompts."""
    rng = np.random.default_rng(seed)
    return [
        make_trial(tokenizer, L, d, int(rng.integers(10_000, 100_000)), shift)
        for L in lengths
        for d in depths
        for shift in shifts
        for _ in range(keys)
    ]


@torch.no_grad()
def retrieves(model, trial: Trial) -> tuple[bool, list[int]]:
    """Whether greedy decoding after the prompt emits the answer tokens, and the
    predicted tokens up to and including the first wrong one."""
    n = trial.answer_len
    x = trial.ids[None, :-1].to(next(model.parameters()).device)
    logits = model(input_ids=x, use_cache=False, logits_to_keep=n).logits[0]
    predicted = logits.argmax(-1).tolist()
    target = trial.ids[-n:].tolist()
    upto: list[int] = []
    for p, t in zip(predicted, target):
        upto.append(p)
        if p != t:
            return False, upto
    return True, upto


def score(model, trials: Sequence[Trial], desc: str = "", quiet: bool = True) -> list[dict]:
    """One record per trial: length, depth, key, found, what was predicted, seconds."""
    from tqdm import tqdm

    out = []
    for trial in tqdm(trials, desc=desc, unit="prompt", disable=quiet, leave=False):
        t0 = time.time()
        found, predicted = retrieves(model, trial)
        out.append(
            dict(
                length=trial.length,
                depth=trial.depth,
                key=trial.key,
                shift=trial.shift,
                needle_at=trial.needle_at,
                tokens=int(trial.ids.numel()),
                found=found,
                predicted=predicted,
                seconds=time.time() - t0,
            )
        )
    return out


def accuracy_grid(
    records: Sequence[dict], lengths: Sequence[int], depths: Sequence[float]
) -> np.ndarray:
    """Share of keys found per (length, depth); NaN where no trial ran."""
    grid = np.full((len(lengths), len(depths)), np.nan)
    for i, L in enumerate(lengths):
        for j, d in enumerate(depths):
            hits = [r["found"] for r in records if r["length"] == L and r["depth"] == d]
            if hits:
                grid[i, j] = sum(hits) / len(hits)
    return grid


# ----------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------

VARIANTS = ("sdpa", "local", "dilated", "sdpa-ft", "dilated-ft")


def with_adapter(model, adapter_dir: str):
    """A copy of ``model`` with the LoRA adapter in ``adapter_dir`` merged into its
    weights (``peft``)."""
    import copy

    from peft import PeftModel

    merged = PeftModel.from_pretrained(copy.deepcopy(model), adapter_dir).merge_and_unload()
    return merged.eval()


def set_variant(model, variant: str, args: argparse.Namespace) -> None:
    """Attention and RoPE scaling of ``variant`` on ``model`` (the ``-ft`` variants run on
    the adapter-merged copy that :func:`with_adapter` makes)."""
    import longnet.integrations.transformers as longnet_hf
    from longnet.integrations.rope import set_rope_scaling

    trained = variant in ("sdpa", "local")
    set_rope_scaling(model, None if trained else args.rope)
    if variant in ("sdpa", "sdpa-ft"):
        model.set_attn_implementation("sdpa")
    elif variant == "local":
        longnet_hf.enable(model, [args.local_window], [1])
    else:
        longnet_hf.enable(model, args.segment_lengths, args.dilation_rates)


def depth_list(text: str) -> list[float]:
    """Comma-separated fractions in [0, 1], e.g. ``0,0.5,1``."""
    try:
        depths = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        depths = []
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated fractions in [0, 1], got {text!r}"
        )
    return depths


def build_parser() -> argparse.ArgumentParser:
    from longnet.cli import int_list
    from longnet.integrations.rope import parse_rope_scaling

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--lengths", type=int_list, default=[2048, 8192, 16384, 32768])
    p.add_argument("--depths", type=depth_list, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--keys", type=int, default=1, help="trials (keys) per length and depth")
    p.add_argument(
        "--shifts",
        type=int_list,
        default=[0],
        help="extra space tokens after the needle (each a trial of its own)",
    )
    p.add_argument("--variants", default="sdpa,local,dilated")
    p.add_argument("--local-window", type=int, default=8192)
    p.add_argument("--segment-lengths", type=int_list, default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--dilation-rates", type=int_list, default=[1, 2, 4, 8, 16])
    p.add_argument("--rope", type=parse_rope_scaling, default=None, help="none or TYPE:FACTOR")
    p.add_argument(
        "--adapter",
        default=None,
        help="LoRA adapter directory of examples/finetune_long_context.py (the -ft variants)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, ...)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the model's dtype (when the harness loads it)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--name", default="passkey", help="file name of the results")
    p.add_argument("--quiet", action="store_true")
    return p


# ----------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    """One row per (variant, length): keys found per depth, the total, time."""
    depths = results["depths"]
    rows = []
    for row in results["rows"]:
        rec = row["records"]
        cells = [
            f"{sum(r['found'] for r in rec if r['depth'] == d)}/"
            f"{sum(1 for r in rec if r['depth'] == d)}"
            for d in depths
        ]
        found = sum(r["found"] for r in rec)
        same = row.get("same_as")
        rows.append(
            [
                row["variant"] + (f" (= {same})" if same else ""),
                f"{row['length']:,}",
                *cells,
                f"{100.0 * found / len(rec):.0f} %",
                "" if same else f"{row['seconds']:.0f}",
                "" if same else f"{row['tokens_per_s']:.0f}",
            ]
        )
    head = ["variant", "tokens", *[f"depth {d:g}" for d in depths], "found", "wall s", "tokens/s"]
    return markdown_table(head, rows)


def heatmap(results: dict[str, Any], path: str) -> bool:
    """One panel per variant: share of keys found, lengths x depths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    variants = list(dict.fromkeys(r["variant"] for r in results["rows"]))
    lengths, depths = results["lengths"], results["depths"]
    fig, axes = plt.subplots(
        1, len(variants), figsize=(2.2 + 2.6 * len(variants), 3.4), squeeze=False
    )
    for ax, variant in zip(axes[0], variants):
        records = [rec for r in results["rows"] if r["variant"] == variant for rec in r["records"]]
        grid = accuracy_grid(records, lengths, depths)
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for i in range(len(lengths)):
            for j in range(len(depths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [f"{L // 1024}K" for L in lengths])
        ax.set_xlabel("needle depth")
        ax.set_title(variant)
    axes[0][0].set_ylabel("prompt tokens")
    fig.suptitle("Passkey retrieval, SmolLM2-135M (trained to 8K): share of keys found")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args: argparse.Namespace, model=None, tokenizer=None) -> dict[str, Any]:
    """Every variant over every (length, depth, key); ``model`` / ``tokenizer`` default
    to SmolLM2-135M-Instruct in ``--dtype``; the model runs on ``--device``."""
    log = (lambda *a, **k: None) if args.quiet else print
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(max(1, args.threads))
    if model is None:
        import transformers

        from longnet.integrations.smollm2 import load_smollm2

        transformers.logging.set_verbosity_error()
        model, tokenizer = load_smollm2(getattr(torch, args.dtype))
    model = model.to(args.device)
    tuned = None
    if any(v.endswith("-ft") for v in variants):
        if not args.adapter:
            raise SystemExit("--variants: the -ft variants need --adapter DIR")
        tuned = with_adapter(model, args.adapter)
    trials = make_trials(tokenizer, args.lengths, args.depths, args.keys, args.seed, args.shifts)
    results: dict[str, Any] = {
        "lengths": args.lengths,
        "depths": args.depths,
        "keys": args.keys,
        "shifts": args.shifts,
        "seed": args.seed,
        "local_window": args.local_window,
        "segment_lengths": args.segment_lengths,
        "dilation_rates": args.dilation_rates,
        "rope": args.rope,
        "adapter": args.adapter,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype),
        "command": " ".join(sys.argv),
        "machine": machine_info(args.threads),
        "rows": [],
    }
    t_start = time.time()
    for variant in variants:
        model_v = tuned if variant.endswith("-ft") else model
        set_variant(model_v, variant, args)
        for L in args.lengths:
            dense = next(
                (r for r in results["rows"] if r["variant"] == "sdpa" and r["length"] == L), None
            )
            if variant == "local" and L <= args.local_window and dense is not None:
                # one block holds the prompt: exactly dense attention, sdpa's row
                results["rows"].append(dict(dense, variant=variant, same_as="sdpa"))
                continue
            cell = [t for t in trials if t.length == L]
            t0 = time.time()
            records = score(model_v, cell, f"{variant} {L}", args.quiet)
            seconds = time.time() - t0
            tokens = sum(r["tokens"] for r in records)
            row = dict(
                variant=variant,
                length=L,
                records=records,
                seconds=seconds,
                tokens_per_s=tokens / seconds,
                load_average=os.getloadavg()[0],
            )
            results["rows"].append(row)
            found = sum(r["found"] for r in records)
            log(
                f"{variant:>10} {L:>6}: {found}/{len(records)} keys, {seconds:.0f} s, "
                f"{row['tokens_per_s']:.0f} tokens/s"
            )
            save_results(results, args.out_dir, args.name, table, heatmap)
    results["total_seconds"] = time.time() - t_start
    save_results(results, args.out_dir, args.name, table, heatmap)
    log(table(results))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
