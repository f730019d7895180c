#!/usr/bin/env python3
"""Past the trained context: perplexity of a real pretrained model (SmolLM2-135M,
trained to 8,192 tokens) with dense and dilated attention, zero-shot and after a short
fine-tune.

Model: SmolLM2-135M-Instruct from ``longnet.integrations.smollm2.load_smollm2``
(offline; 30 layers, 9 query / 3 key-value heads of 64, rope theta 100,000, RoPE as
trained: no rescaling).

Text: the ``.py`` sources of the running Python's standard library, split by file with
``longnet.data.split_by_file`` (CRC32 of the relative path, 5 % held out). Held-out
files are tokenized with the model's tokenizer and concatenated (EOS between files);
at each length ``L`` the evaluation windows are ``--windows`` evenly spaced stretches
of ``L + 1`` tokens of that stream (``L`` inputs, ``L`` targets), the same windows
for every variant. Perplexity is ``exp`` of the mean next-token loss over all ``L``
targets of all windows; ``last 1K`` is the same over each window's last 1,024
targets (the tokens with the longest context). The fine-tune reads only the training
files.

Variants (``--variants``):

* ``sdpa``: dense causal attention, as the model was trained;
* ``local``: block-local attention, one pattern ``(w, 1)`` with ``w = --local-window``
  (8,192: every query sees its own block of the trained length);
* ``dilated``: ``--segment-lengths`` / ``--dilation-rates`` (default
  ``[4096, 8192]`` / ``[1, 2]``: every query keeps its 4K segment dense and every
  other key of its 8K segment; no two linked tokens are 8,192 or more apart, so RoPE
  stays within its trained distances), zero-shot;
* ``dilated-ft``: the same patterns after ``--ft-steps`` AdamW steps at
  ``--ft-seq-len`` tokens on the training files (through
  ``examples/finetune_transformers.py``'s training loop; ``--ft-params attention``
  trains only the attention projections).

Rows whose attention is exactly dense (``local`` at ``L <= w``) are not recomputed:
they are sdpa's row, marked ``= sdpa``. Each row's wall time and tokens/s are
measured; results are written after every row (``context_extension.json``), with a
markdown table (``.md``) and a plot (``.png``) under ``--out-dir``.

    python benchmarks/context_extension.py                      # the default run
    python benchmarks/context_extension.py --lengths 2048,8192 --ft-steps 2 --ft-seq-len 2048  # quick
    python benchmarks/context_extension.py --windows 8,4,2,2 --ft-steps 200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

# Idle OpenMP threads sleep instead of spinning (shared CPUs). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import longnet  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import finetune_transformers as ft  # noqa: E402  (examples/finetune_transformers.py)
import transformers  # noqa: E402
from common import machine_info, markdown_table  # noqa: E402  (benchmarks/common.py)

import longnet.integrations.transformers as longnet_hf  # noqa: E402
from longnet.cli import int_list  # noqa: E402
from longnet.data import split_by_file, stdlib_source_files  # noqa: E402
from longnet.integrations.smollm2 import load_smollm2  # noqa: E402

VARIANTS = ("sdpa", "local", "dilated", "dilated-ft")
LAST = 1024


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--lengths", type=int_list, default=[2048, 8192, 16384, 32768])
    p.add_argument(
        "--windows",
        type=int_list,
        default=[2, 1, 1, 1],
        help="windows per length (one number, or one per length)",
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    p.add_argument("--local-window", type=int, default=8192)
    # the patterns and the fine-tune are those of `finetune_transformers.py --model smollm2`
    smollm2 = ft.DEFAULTS["smollm2"]
    p.add_argument("--segment-lengths", type=int_list, default=smollm2["segment_lengths"])
    p.add_argument("--dilation-rates", type=int_list, default=smollm2["dilation_rates"])
    p.add_argument("--ft-steps", type=int, default=smollm2["steps"])
    p.add_argument("--ft-seq-len", type=int, default=smollm2["seq_len"])
    p.add_argument("--ft-batch-size", type=int, default=smollm2["batch_size"])
    p.add_argument("--ft-lr", type=float, default=smollm2["lr"])
    p.add_argument("--ft-warmup-steps", type=int, default=smollm2["warmup_steps"])
    p.add_argument("--ft-params", default=smollm2["train_params"], choices=["attention", "all"])
    p.add_argument("--max-train-bytes", type=int, default=smollm2["max_train_bytes"])
    p.add_argument(
        "--chunk",
        type=int,
        default=2048,
        help="tokens per slice of the output projection + loss (memory)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--quiet", action="store_true")
    return p


def encode(files: Sequence[str], tokenizer, max_bytes: int | None = None) -> np.ndarray:
    return ft.encode_with_tokenizer(files, tokenizer, max_bytes)


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Next-token losses (float64, ``L``) of one window of ``L + 1`` tokens; the
    vocabulary projection runs ``chunk`` positions at a time (full logits of 32K
    tokens would be 6 GiB)."""
    x, y = ids[None, :-1], ids[1:]
    hidden = model.model(input_ids=x, use_cache=False).last_hidden_state[0]
    out = []
    for s in range(0, hidden.shape[0], chunk):
        logits = model.lm_head(hidden[s : s + chunk]).float()
        out.append(F.cross_entropy(logits, y[s : s + chunk], reduction="none").double())
    return torch.cat(out)


def windows_for(tokens: np.ndarray, length: int, count: int) -> list[torch.Tensor]:
    if tokens.size < length + 1:
        raise SystemExit(
            f"the held-out text has {tokens.size:,} tokens, fewer than "
            f"{length + 1:,} for a window of {length:,}"
        )
    starts = np.linspace(0, tokens.size - length - 1, num=max(1, count)).astype(np.int64)
    return [torch.from_numpy(tokens[s : s + length + 1].astype(np.int64)) for s in starts]


def evaluate(
    model, windows: list[torch.Tensor], chunk: int, desc: str, quiet: bool
) -> dict[str, Any]:
    from tqdm import tqdm

    t0 = time.time()
    losses = [
        window_nll(model, w, chunk)
        for w in tqdm(windows, desc=desc, unit="window", disable=quiet, leave=False)
    ]
    seconds = time.time() - t0
    every = torch.cat(losses)
    last = torch.cat([window[-LAST:] for window in losses])
    return {
        "ppl": math.exp(float(every.mean())),
        "ppl_last1k": math.exp(float(last.mean())),
        "tokens": int(every.numel()),
        "windows": len(windows),
        "seconds": seconds,
        "tokens_per_s": every.numel() / seconds,
    }


def set_variant(model, variant: str, args) -> None:
    if variant == "sdpa":
        model.set_attn_implementation("sdpa")
    elif variant == "local":
        longnet_hf.enable(model, [args.local_window], [1])
    else:
        longnet_hf.enable(model, args.segment_lengths, args.dilation_rates)


def fine_tune(model, tokenizer, files, args, log) -> dict[str, Any]:
    """``--ft-steps`` of AdamW at ``--ft-seq-len`` with the dilated patterns, through
    the example's training loop."""
    train_tokens = encode(files, tokenizer, args.max_train_bytes)
    longnet_hf.enable(model, args.segment_lengths, args.dilation_rates)
    params = ft.trainable_parameters(model, args.ft_params)
    history: list = []
    t0 = time.time()
    ft.train(
        model,
        train_tokens,
        steps=args.ft_steps,
        seq_len=args.ft_seq_len,
        batch_size=args.ft_batch_size,
        lr=args.ft_lr,
        warmup=args.ft_warmup_steps,
        device="cpu",
        gen=torch.Generator().manual_seed(args.seed),
        desc=f"fine-tune (dilated, {args.ft_seq_len})",
        quiet=args.quiet,
        history=history,
        params=params,
    )
    model.eval()
    out = {
        "steps": args.ft_steps,
        "seq_len": args.ft_seq_len,
        "batch_size": args.ft_batch_size,
        "lr": args.ft_lr,
        "params": args.ft_params,
        "trainable": sum(p.numel() for p in params),
        "train_tokens": int(train_tokens.size),
        "seconds": time.time() - t0,
        "loss": history,
    }
    log(
        f"fine-tuned {args.ft_steps} steps in {out['seconds']:.0f} s; loss "
        f"{history[0][1]:.3f} -> {history[-1][1]:.3f}"
    )
    return out


def table(results: dict[str, Any]) -> str:
    rows = []
    for r in results["rows"]:
        same = " (= sdpa)" if r.get("same_as") else ""
        rows.append(
            [
                r["variant"] + same,
                f"{r['length']:,}",
                r["windows"],
                f"{r['ppl']:.3f}",
                f"{r['ppl_last1k']:.3f}",
                "" if r.get("same_as") else f"{r['seconds']:.0f}",
                "" if r.get("same_as") else f"{r['tokens_per_s']:.0f}",
            ]
        )
    return markdown_table(
        ["variant", "tokens", "windows", "perplexity", "last 1K", "wall s", "tokens/s"], rows
    )


def save(results: dict[str, Any], out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, "context_extension")
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(table(results) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in (
        (axes[0], "ppl", "whole window"),
        (axes[1], "ppl_last1k", f"last {LAST} tokens of each window"),
    ):
        for variant in VARIANTS:
            pts = sorted((r["length"], r[key]) for r in results["rows"] if r["variant"] == variant)
            if pts:
                ax.plot(*zip(*pts), "o-", label=variant)
        ax.axvline(8192, color="gray", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per window (trained context: 8,192)")
        ax.set_ylabel("perplexity")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SmolLM2-135M on held-out stdlib source: dense vs dilated attention")
    fig.tight_layout()
    fig.savefig(base + ".png", dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    log = (lambda *a, **k: None) if args.quiet else print
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; choose from {VARIANTS}")
    variants = [v for v in VARIANTS if v in variants]  # the fine-tuned model comes last
    windows = args.windows if len(args.windows) > 1 else args.windows * len(args.lengths)
    if len(windows) != len(args.lengths):
        raise SystemExit(
            f"--windows: one number or one per length ({len(args.lengths)}), got {args.windows}"
        )
    torch.set_num_threads(max(1, args.threads))
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t_start = time.time()

    model, tokenizer = load_smollm2(torch.float32)
    root, files = stdlib_source_files()
    train_files, val_files = split_by_file(files, root)
    val = encode(val_files, tokenizer)
    log(f"held-out text: {len(val_files)} stdlib files under {root}, {val.size:,} tokens")
    results: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), float32",
        "text": f"held-out .py files of the standard library ({root}), split_by_file 5 %",
        "val_files": len(val_files),
        "val_tokens": int(val.size),
        "lengths": args.lengths,
        "windows": windows,
        "local_window": args.local_window,
        "segment_lengths": args.segment_lengths,
        "dilation_rates": args.dilation_rates,
        "command": " ".join(sys.argv),
        "machine": machine_info(args.threads),
        "load_average_start": os.getloadavg(),
        "rows": [],
    }
    wins = {L: windows_for(val, L, n) for L, n in zip(args.lengths, windows)}

    def add_rows(variant: str) -> None:
        set_variant(model, variant, args)
        for L in args.lengths:
            if variant == "local" and L <= args.local_window:
                sdpa = next(
                    (r for r in results["rows"] if r["variant"] == "sdpa" and r["length"] == L),
                    None,
                )
                if sdpa is not None:  # one segment holds the window: dense attention
                    results["rows"].append(dict(sdpa, variant=variant, same_as="sdpa"))
                    continue
            row = evaluate(model, wins[L], args.chunk, f"{variant} {L}", args.quiet)
            row.update(variant=variant, length=L, load_average=os.getloadavg()[0])
            results["rows"].append(row)
            log(
                f"{variant:>10} {L:>6}: perplexity {row['ppl']:.3f} (last 1K "
                f"{row['ppl_last1k']:.3f}), {row['seconds']:.0f} s, "
                f"{row['tokens_per_s']:.0f} tokens/s"
            )
            save(results, args.out_dir)

    for variant in variants:
        if variant == "dilated-ft":
            results["fine_tune"] = fine_tune(model, tokenizer, train_files, args, log)
        add_rows(variant)
    results["total_seconds"] = time.time() - t_start
    save(results, args.out_dir)
    log(table(results))
    log(f"total {results['total_seconds']:.0f} s; wrote {args.out_dir}/context_extension.*")
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
