#!/usr/bin/env python3
"""Fine-tune a Hugging Face ``transformers`` causal LM with dilated attention at a
context well past the one it was trained for.

1. The model: by default a tiny randomly initialised Llama (byte vocabulary, context
   ``--context`` = ``max_position_embeddings`` = 256), first trained briefly at that
   context with ordinary attention (``sdpa``) so that it stands in for a pretrained
   checkpoint; ``--model smollm2`` for SmolLM2-135M-Instruct (trained to 8,192
   tokens; offline through ``longnet.integrations.smollm2.load_smollm2``, the
   short fine-tune of ``benchmarks/context_extension.py`` by default: 6 steps of
   8,192 tokens with ``w = [4096, 8192]``, ``r = [1, 2]``, lr 3e-4, on the attention
   projections); or any local checkpoint with
   ``--model PATH`` (its own tokenizer is used when it has one; no download happens).
2. ``longnet.integrations.transformers.enable`` switches it to dilated attention with
   patterns reaching ``--seq-len`` (default 1024 = 4x the original context).
3. It is fine-tuned at ``--seq-len`` on the project's built-in corpus (the Python
   standard library's ``.py`` sources, split by file) with a tqdm progress bar.

It reports the validation loss (nats per token) at the original context, and at the
long context for dense attention, for dilated attention before and after
fine-tuning; saves the model with ``save_pretrained`` and checks that
``from_pretrained(..., attn_implementation="longnet")`` gives it back; writes
``metrics.json`` and ``finetune_loss.png`` under ``--out-dir``.

    python examples/finetune_transformers.py                   # tiny model, CPU, minutes
    python examples/finetune_transformers.py --model smollm2    # SmolLM2-135M, 8K tokens
    python examples/finetune_transformers.py --model /path/to/checkpoint --seq-len 16384 \
        --segment-lengths 2048,4096,8192,16384 --dilation-rates 1,2,4,8 --device cuda
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

try:
    import longnet  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from longnet.cli import int_list  # noqa: E402
from longnet.data import (  # noqa: E402
    encode_files,
    eval_batches,
    random_batch,
    split_by_file,
    stdlib_source_files,
)
from longnet.tokenizer import ByteTokenizer  # noqa: E402

try:
    import transformers  # noqa: E402
except ImportError:  # pragma: no cover
    raise SystemExit('this example needs transformers: pip install -e ".[transformers]"') from None

import longnet.integrations.transformers as longnet_hf  # noqa: E402
from longnet.integrations.smollm2 import load_smollm2  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model",
        default=None,
        help='local transformers checkpoint, or "smollm2" (SmolLM2-135M-Instruct '
        "through longnet.integrations.smollm2.load_smollm2, offline); "
        "default: a tiny random-init Llama",
    )
    p.add_argument("--out-dir", default="runs/finetune_transformers")
    # Defaults that depend on the model (tiny / smollm2) are filled in by apply_defaults.
    p.add_argument("--seq-len", type=int, default=None, help="fine-tuning length")
    p.add_argument("--segment-lengths", type=int_list, default=None)
    p.add_argument("--dilation-rates", type=int_list, default=None)
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument(
        "--train-params",
        default=None,
        choices=["all", "attention"],
        help="fine-tune every parameter, or only the attention projections",
    )
    p.add_argument("--eval-interval", type=int, default=None, help="0: no evaluation in between")
    p.add_argument("--eval-windows", type=int, default=None)
    p.add_argument("--max-train-bytes", type=int, default=None)
    # The tiny stand-in for a pretrained model (ignored with --model).
    p.add_argument(
        "--context",
        type=int,
        default=256,
        help="max_position_embeddings of the tiny model, its training length",
    )
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--pretrain-batch-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="parameter dtype of a --model checkpoint",
    )
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# Fine-tuning defaults per model. For SmolLM2 (trained to 8,192 tokens) they are the
# short fine-tune of benchmarks/context_extension.py: the patterns of that benchmark's
# dilated rows, 2,048-token steps of the attention projections (a CPU budget).
_TINY = dict(
    seq_len=1024,
    segment_lengths=[128, 256, 512, 1024],
    dilation_rates=[1, 2, 4, 8],
    steps=150,
    batch_size=4,
    lr=1e-3,
    warmup_steps=15,
    train_params="all",
    eval_interval=50,
    eval_windows=16,
    max_train_bytes=4_000_000,
)
DEFAULTS = {
    "tiny": _TINY,
    "smollm2": dict(
        seq_len=8192,
        segment_lengths=[4096, 8192],
        dilation_rates=[1, 2],
        steps=6,
        batch_size=1,
        lr=3e-4,
        warmup_steps=1,
        train_params="attention",
        eval_interval=0,
        eval_windows=1,
        max_train_bytes=2_000_000,
    ),
    # a given checkpoint: the tiny run's settings at a tenth of its learning rate
    "checkpoint": {**_TINY, "lr": 1e-4},
}


def apply_defaults(args: argparse.Namespace) -> argparse.Namespace:
    kind = "tiny" if args.model is None else "smollm2" if args.model == "smollm2" else "checkpoint"
    for key, value in DEFAULTS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------


def tiny_llama(args: argparse.Namespace):
    tok = ByteTokenizer()
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.context,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(args.seed)
    return transformers.LlamaForCausalLM(config)


def encode_with_tokenizer(files: Sequence[str], tokenizer, max_bytes: int | None) -> np.ndarray:
    """One token stream (``file EOS`` per file) with a checkpoint's own tokenizer."""
    parts, total = [], 0
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        ids = tokenizer(data.decode("utf-8", errors="replace"), add_special_tokens=False)[
            "input_ids"
        ]
        parts.append(np.asarray(list(ids) + [eos], dtype=np.int64))
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return np.concatenate(parts)


def load_model_and_data(args: argparse.Namespace, log):
    root, files = stdlib_source_files()
    train_files, val_files = split_by_file(files, root)
    if args.model is None:
        model = tiny_llama(args)
        encode = lambda fs, mb: encode_files(fs, max_bytes=mb)  # noqa: E731
        unit = "byte"
    elif args.model == "smollm2":
        model, tokenizer = load_smollm2(getattr(torch, args.dtype))
        encode = lambda fs, mb: encode_with_tokenizer(fs, tokenizer, mb)  # noqa: E731
        unit = "token"
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.model, dtype=getattr(torch, args.dtype)
        )
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
            encode = lambda fs, mb: encode_with_tokenizer(fs, tokenizer, mb)  # noqa: E731
            unit = "token"
        except Exception as exc:  # no tokenizer files: bytes, if the vocabulary allows
            if model.config.vocab_size < ByteTokenizer.vocab_size:
                raise SystemExit(
                    f"{args.model}: no tokenizer ({exc}) and a vocabulary too "
                    "small for the byte tokenizer"
                ) from exc
            encode = lambda fs, mb: encode_files(fs, max_bytes=mb)  # noqa: E731
            unit = "byte"
    train = encode(train_files, args.max_train_bytes)
    val = encode(val_files, None)
    log(
        f"data: Python stdlib .py files under {root}; train {len(train_files)} files / "
        f"{train.size:,} tokens, validation {len(val_files)} files / {val.size:,} tokens"
    )
    model.set_attn_implementation("sdpa")
    return model.to(args.device), train, val, unit


# ---------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------


def lm_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model, batches, device: str) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        total += float(lm_loss(model, x.to(device), y.to(device))) * y.numel()
        count += y.numel()
    return total / count


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def trainable_parameters(model, which: str = "all"):
    """The parameters to fine-tune: ``"all"``, or ``"attention"`` (the q/k/v/o
    projections of every attention module; the rest is frozen)."""
    if which == "all":
        return [p for p in model.parameters() if p.requires_grad]
    if which != "attention":
        raise ValueError(f'which must be "all" or "attention", got {which!r}')
    params = []
    for name, p in model.named_parameters():
        keep = ".self_attn." in name or ".attention." in name
        p.requires_grad_(keep)
        if keep:
            params.append(p)
    if not params:
        raise ValueError(
            "no attention parameters found (expected names containing "
            "'.self_attn.' or '.attention.')"
        )
    return params


def train(
    model,
    tokens,
    *,
    steps,
    seq_len,
    batch_size,
    lr,
    warmup,
    device,
    gen,
    desc,
    quiet,
    history,
    step0=0,
    on_eval=None,
    eval_interval=0,
    params=None,
):
    """AdamW with warm-up and cosine decay on ``params`` (default: all parameters);
    appends (global step, loss) to history."""
    params = list(model.parameters()) if params is None else list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    from tqdm import tqdm

    bar = tqdm(range(steps), desc=desc, unit="step", disable=quiet, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        model.train()
        x, y = random_batch(tokens, batch_size, seq_len, gen)
        loss = lm_loss(model, x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        value = float(loss.detach())
        history.append((step0 + step + 1, value))
        bar.set_postfix(loss=f"{value:.3f}")
        if (
            on_eval is not None
            and eval_interval
            and (step + 1) % eval_interval == 0
            and step + 1 < steps
        ):
            on_eval(step0 + step + 1)
    bar.close()


def save_plot(history: dict[str, Any], path: str, title: str, unit: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key, label in (
        ("pretrain", "train, sdpa at the original context"),
        ("finetune", "train, dilated at the long context"),
    ):
        if history[key]:
            steps, losses = zip(*history[key])
            k = max(1, len(losses) // 30)
            smooth = [float(np.mean(losses[max(0, i - k + 1) : i + 1])) for i in range(len(losses))]
            ax.plot(steps, smooth, lw=1.5, label=f"{label} ({k}-step mean)")
    if history["val"]:
        steps, losses = zip(*history["val"])
        ax.plot(steps, losses, "o-", lw=2, label="validation, dilated at the long context")
    for key, marker, label in (
        ("sdpa_context", "s", "validation, sdpa at the original context"),
        ("sdpa_long", "x", "validation, sdpa at the long context"),
    ):
        if history.get(key) is not None:
            ax.plot([history["switch"]], [history[key]], marker, ms=8, label=label)
    if history["switch"] is not None:
        ax.axvline(history["switch"], color="gray", ls="--", lw=1)
        ax.text(
            history["switch"],
            ax.get_ylim()[1],
            " switch to dilated attention",
            va="top",
            fontsize=8,
            color="gray",
        )
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (nats / {unit})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    log = (lambda *a, **k: None) if args.quiet else print
    t_start = time.time()
    torch.set_num_threads(max(1, args.threads))
    os.makedirs(args.out_dir, exist_ok=True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # its save/load bars
    if max(args.segment_lengths) < args.seq_len:
        log(
            f"note: the largest segment ({max(args.segment_lengths)}) is shorter than "
            f"--seq-len ({args.seq_len}): tokens further apart only meet through the stack"
        )

    model, train_tokens, val_tokens, unit = load_model_and_data(args, log)
    context = model.config.max_position_embeddings
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"model: {type(model).__name__}, {n_params / 1e6:.2f} M parameters, "
        f"max_position_embeddings = {context}"
    )
    gen = torch.Generator().manual_seed(args.seed)
    history: dict[str, Any] = {
        "pretrain": [],
        "finetune": [],
        "val": [],
        "switch": None,
        "sdpa_context": None,
        "sdpa_long": None,
    }
    metrics: dict[str, Any] = {
        "model": args.model or "tiny random-init Llama",
        "parameters": n_params,
        "context": context,
        "seq_len": args.seq_len,
        "segment_lengths": args.segment_lengths,
        "dilation_rates": args.dilation_rates,
        "unit": unit,
        "transformers": transformers.__version__,
    }

    # At the original context only when fine-tuning goes past it.
    short_val = (
        eval_batches(val_tokens, context, args.eval_windows, args.batch_size)
        if args.seq_len > context
        else None
    )
    long_val = eval_batches(val_tokens, args.seq_len, args.eval_windows, args.batch_size)

    step0 = 0
    if args.model is None and args.pretrain_steps > 0:
        t0 = time.time()
        train(
            model,
            train_tokens,
            steps=args.pretrain_steps,
            seq_len=context,
            batch_size=args.pretrain_batch_size,
            lr=args.pretrain_lr,
            warmup=max(1, args.pretrain_steps // 10),
            device=args.device,
            gen=gen,
            desc=f"pretrain (sdpa, {context})",
            quiet=args.quiet,
            history=history["pretrain"],
        )
        metrics["pretrain_seconds"] = time.time() - t0
        step0 = args.pretrain_steps

    metrics["val_sdpa_context"] = (
        evaluate(model, short_val, args.device) if short_val is not None else None
    )
    metrics["val_sdpa_long"] = evaluate(model, long_val, args.device)
    if short_val is not None:
        log(
            f"validation, sdpa: {metrics['val_sdpa_context']:.4f} at {context} tokens, "
            f"{metrics['val_sdpa_long']:.4f} at {args.seq_len} (past its context)"
        )
    else:
        log(
            f"validation, sdpa: {metrics['val_sdpa_long']:.4f} at {args.seq_len} tokens "
            f"(within its context of {context})"
        )

    history["sdpa_context"], history["sdpa_long"] = (
        metrics["val_sdpa_context"],
        metrics["val_sdpa_long"],
    )

    longnet_hf.enable(model, args.segment_lengths, args.dilation_rates)
    history["switch"] = step0
    metrics["val_dilated_before"] = evaluate(model, long_val, args.device)
    history["val"].append((step0, metrics["val_dilated_before"]))
    log(
        f"validation, dilated at {args.seq_len} before fine-tuning: "
        f"{metrics['val_dilated_before']:.4f}"
    )

    def on_eval(step: int) -> None:
        history["val"].append((step, evaluate(model, long_val, args.device)))

    t0 = time.time()
    params = trainable_parameters(model, args.train_params)
    metrics["trainable_parameters"] = sum(p.numel() for p in params)
    train(
        model,
        train_tokens,
        steps=args.steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup_steps,
        device=args.device,
        gen=gen,
        desc=f"fine-tune (longnet, {args.seq_len})",
        quiet=args.quiet,
        history=history["finetune"],
        step0=step0,
        on_eval=on_eval,
        eval_interval=args.eval_interval,
        params=params,
    )
    metrics["finetune_seconds"] = time.time() - t0
    metrics["val_dilated_after"] = evaluate(model, long_val, args.device)
    history["val"].append((step0 + args.steps, metrics["val_dilated_after"]))
    log(
        f"validation, dilated at {args.seq_len} after {args.steps} steps: "
        f"{metrics['val_dilated_after']:.4f}"
    )

    # Save, and load back with the patterns from the config.
    model_dir = os.path.join(args.out_dir, "model")
    model.save_pretrained(model_dir)
    loaded = (
        type(model)
        .from_pretrained(
            model_dir, attn_implementation="longnet", dtype=next(model.parameters()).dtype
        )
        .to(args.device)
    )
    x, _ = long_val[0]
    with torch.no_grad():
        same = torch.equal(
            loaded.eval()(input_ids=x.to(args.device)).logits,
            model.eval()(input_ids=x.to(args.device)).logits,
        )
    if not same:
        raise SystemExit("the reloaded model computes something else")
    log(
        f'saved to {model_dir}; from_pretrained(..., attn_implementation="longnet") '
        f"restores patterns {loaded.config.longnet_segment_lengths} / "
        f"{loaded.config.longnet_dilation_rates}"
    )

    metrics["total_seconds"] = time.time() - t_start
    metrics["history"] = history
    with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    title = (
        f"{metrics['model']}: context {context} -> {args.seq_len} "
        f"(w={args.segment_lengths}, r={args.dilation_rates})"
    )
    if save_plot(history, os.path.join(args.out_dir, "finetune_loss.png"), title, unit):
        log(f"plot: {os.path.join(args.out_dir, 'finetune_loss.png')}")
    log(f"total {metrics['total_seconds']:.0f} s (fine-tuning {metrics['finetune_seconds']:.0f} s)")
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(apply_defaults(build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
