#!/usr/bin/env python3
"""Resumable LoRA fine-tune of SmolLM2-135M-Instruct with dilated attention, on natural
text only, towards retrieval past the trained context.

The model (``longnet.integrations.smollm2.load_smollm2``, trained to 8,192 tokens) is
switched to dilated attention with ``--segment-lengths`` / ``--dilation-rates`` and,
with ``--rope TYPE:FACTOR``, rescaled RoPE (``longnet.integrations.rope.
set_rope_scaling``); LoRA adapters (``peft``, rank ``--lora-rank``) on the q/k/v/o
projections are trained with AdamW (warm-up, cosine decay) on ``--seq-len``-token
windows of the Python standard library's ``.py`` sources (the training split of
``longnet.data.split_by_file``; never passkey-like prompts).

Every ``--save-every`` steps the run writes ``state.pt`` under ``--out-dir`` (adapter
weights, optimizer, step, the data generator's state, the loss history and the
settings) and the adapter itself with ``save_pretrained``
(``adapter/adapter_model.safetensors``, a few MB; ``benchmarks/passkey.py --adapter``
reads it); started again with the same ``--out-dir`` it continues from there and
refuses settings that would change the run (the learning-rate curve depends on
``--steps``). At the end it writes ``recipe.json`` (patterns, RoPE, LoRA, data, steps,
seconds, losses).

    python examples/finetune_long_context.py --steps 40                   # CPU, resumable
    python examples/finetune_long_context.py --seq-len 16384 --steps 400 --device cuda \\
        --segment-lengths 2048,4096,8192,16384 --dilation-rates 1,2,4,8 --rope yarn:2
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

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:
    import longnet  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import longnet.integrations.transformers as longnet_hf  # noqa: E402
from longnet.cli import int_list  # noqa: E402
from longnet.data import random_batch, split_by_file, stdlib_source_files  # noqa: E402
from longnet.integrations.rope import parse_rope_scaling, set_rope_scaling  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Settings that define the run: a resume with other values would be another run.
RUN_KEYS = (
    "seq_len",
    "segment_lengths",
    "dilation_rates",
    "rope",
    "lora_rank",
    "lora_alpha",
    "steps",
    "lr",
    "warmup_steps",
    "batch_size",
    "max_train_bytes",
    "seed",
    "dtype",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out-dir", default="runs/long_context")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--segment-lengths", type=int_list, default=[1024, 4096])
    p.add_argument("--dilation-rates", type=int_list, default=[1, 4])
    p.add_argument(
        "--rope",
        type=parse_rope_scaling,
        default=None,
        help="none, or TYPE:FACTOR with TYPE linear, yarn or dynamic",
    )
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-train-bytes", type=int, default=4_000_000)
    p.add_argument("--save-every", type=int, default=1, help="steps between state.pt writes")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop (saved) after this many steps of this invocation; run again to go on",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to a tenth of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in RUN_KEYS}


def load_state(path: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state of this run, or None when there is none; a state saved with
    other settings raises SystemExit naming them."""
    if not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state["settings"]
    changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    if changed:
        diff = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise SystemExit(
            f"{path} was saved by a run with other settings ({diff}); resume with the "
            "saved settings, or pass another --out-dir for a new run"
        )
    return state


def build_model(args: argparse.Namespace):
    """SmolLM2 with the patterns, the RoPE scaling and fresh LoRA adapters."""
    from peft import LoraConfig, get_peft_model

    from longnet.integrations.smollm2 import load_smollm2

    model, tokenizer = load_smollm2(getattr(torch, args.dtype))
    set_rope_scaling(model, args.rope)
    longnet_hf.enable(model, args.segment_lengths, args.dilation_rates)
    torch.manual_seed(args.seed)  # LoRA's A matrices
    lora = LoraConfig(
        r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS
    )
    return get_peft_model(model, lora).to(args.device), tokenizer


def train_tokens(tokenizer, max_bytes: int):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from finetune_transformers import encode_with_tokenizer

    root, files = stdlib_source_files()
    train_files, _ = split_by_file(files, root)
    return encode_with_tokenizer(train_files, tokenizer, max_bytes), root


def lm_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm import tqdm

    log = (lambda *a, **k: None) if args.quiet else print
    torch.set_num_threads(max(1, args.threads))
    os.makedirs(args.out_dir, exist_ok=True)
    state_path = os.path.join(args.out_dir, "state.pt")
    settings = run_settings(args)
    state = load_state(state_path, settings)

    model, tokenizer = build_model(args)
    tokens, root = train_tokens(tokenizer, args.max_train_bytes)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    history: list[tuple[int, float]] = []
    seconds, step0 = 0.0, 0
    if state is not None:
        set_peft_model_state_dict(model, state["adapter"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        history, seconds, step0 = state["history"], state["seconds"], state["step"]
        log(f"resuming {state_path} at step {step0} of {args.steps}")
    log(
        f"fine-tune: {sum(p.numel() for p in params):,} LoRA parameters, {tokens.size:,} "
        f"training tokens ({root}), {args.steps} steps of {args.batch_size} x {args.seq_len}"
    )

    def save(step: int) -> None:
        state = {
            "settings": settings,
            "adapter": get_peft_model_state_dict(model),
            "optimizer": opt.state_dict(),
            "generator": gen.get_state(),
            "history": history,
            "seconds": seconds,
            "step": step,
        }
        torch.save(state, state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)  # a crash never leaves half a state

    adapter_dir = os.path.join(args.out_dir, "adapter")
    model.train()
    stop = args.steps if args.stop_after is None else min(args.steps, step0 + args.stop_after)
    bar = tqdm(
        range(step0, stop),
        desc="fine-tune",
        unit="step",
        disable=args.quiet,
        initial=step0,
        total=args.steps,
    )
    for step in bar:
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup_steps)
        x, y = random_batch(tokens, args.batch_size, args.seq_len, gen)
        loss = lm_loss(model, x.to(args.device), y.to(args.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        seconds += time.time() - t0
        history.append((step + 1, float(loss.detach())))
        bar.set_postfix(loss=f"{history[-1][1]:.3f}")
        if (step + 1) % args.save_every == 0 or step + 1 == stop:
            save(step + 1)
            model.save_pretrained(adapter_dir)  # the latest adapter, for evaluation meanwhile
    bar.close()
    if stop < args.steps:
        log(f"stopped at step {stop} of {args.steps}; run the same command again to go on")
        return {"step": stop, "loss": history}

    recipe = {
        **settings,
        "lora_targets": LORA_TARGETS,
        "train_tokens": int(tokens.size),
        "text": f"training split of the .py files under {root}",
        "seconds": seconds,
        "loss": history,
        "command": " ".join(sys.argv),
    }
    with open(os.path.join(args.out_dir, "recipe.json"), "w") as f:
        json.dump(recipe, f, indent=1)
    log(
        f"{args.steps} steps in {seconds:.0f} s; loss {history[0][1]:.3f} -> "
        f"{history[-1][1]:.3f}; adapter in {adapter_dir}"
    )
    return recipe


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
