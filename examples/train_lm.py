#!/usr/bin/env python3
"""Train a byte-level LongNet language model.

Default corpus: the ``.py`` files of the Python standard library found on this
machine, split into train and validation by file. The defaults (0.83 M parameters,
800 steps of 8 x 512 bytes) take about four minutes on an idle 2-core CPU (ten on a
busy one), and the validation loss falls from 5.53 (about uniform over the 259 ids)
to 1.51 nats per byte.

    python examples/train_lm.py                         # defaults
    python examples/train_lm.py --steps 2000 --seq-len 2048 \
        --segment-lengths 256,512,1024,2048 --dilation-rates 1,2,4,8 --device cuda
    python examples/train_lm.py --resume                # continue out-dir's checkpoint
    torchrun --nproc_per_node=4 examples/train_lm.py --dp 2 --sp 2 --activation-checkpointing
    torchrun --nproc_per_node=2 examples/train_lm.py --sequence-parallel   # = --sp 2
    python examples/train_lm.py --pack-documents        # each file its own document
    torchrun --nproc_per_node=4 examples/train_lm.py --pack-documents --dp 2 --sp 2

Under torchrun the ranks form a ``(dp, sp)`` device mesh (``longnet.parallel``):
every sequence is split over ``sp`` ranks, the ``--batch-size`` sequences of a step
(the global batch, so one command line is the same run at any mesh) over ``dp``, and
FSDP2 shards parameters, gradients and optimizer state over all ``dp * sp`` ranks.
Checkpoints are ``torch.distributed.checkpoint`` directories under ``OUT_DIR/dcp``
(sharded under torchrun, one process's otherwise) and resume on any mesh, one process
included, so a run started on one machine can continue on many and back; the model is
also exported to ``OUT_DIR/checkpoint`` for ``generate.py``.

``--pack-documents`` trains on each file as its own document: rows of ``--seq-len``
tokens carry their file boundaries (``cu_seqlens``), no file attends to another,
positions restart at every file and no token predicts the next file's first one;
validation uses packed rows too. Under torchrun every dp rank packs its share of the
step's rows into one row, split over the sp ranks (a file may cross them).
``--align-documents A`` (with sp > 1) puts pad filler, without targets, before every
training file that would cross a sequence-parallel cut, so that it starts a multiple
of ``A`` tokens before the cut: patterns with ``w`` dividing ``A`` then exchange nothing
there (``benchmarks/plan_document_alignment.py``: 16K costs under 1% filler and
halves the worst rank's traffic). The training rows then depend on sp.

``--attention``: ``dilated`` (``--segment-lengths`` / ``--dilation-rates``), ``dense``
(one pattern ``w = seq_len, r = 1``: full causal attention) or ``sliding`` (one pattern
``w = --window, r = 1``: each query sees its own window-sized block up to itself, a
segment pattern rather than a per-query sliding mask), all through the same operator.

``--chunk-size N`` computes every layer's feed-forward and the LM head with the loss
over ``N`` positions at a time, recomputed in backward (``LongNetLM.set_chunk_size``):
with ``--activation-checkpointing`` one process trains on a million tokens
(``python -m longnet.plan ... --chunk-size N`` counts it).

Outputs under ``--out-dir``: ``checkpoint/`` (a ``save_pretrained`` directory),
``dcp/step_*`` (the training checkpoints: model, optimizer, learning-rate schedule,
data position, every rank's generator states and loss history), ``metrics.json`` and
``loss_curve.png``.

What a run reproduces: the training loss of a step is the token-weighted mean over the
whole global batch (``longnet.parallel.token_mean_loss``), so any mesh gives one
process's losses and gradients up to the order of the sums (dropout off), also when
targets are ignored. A resume continues the learning-rate curve it was on (a new
``--steps`` moves the end of the decay without a jump) and, on a mesh of the same
shape, every rank's generator states, so a run with dropout resumes bit for bit.
Every dp row and sp shard draws dropout masks of its own (``longnet.parallel.seed_rank``):
on a mesh of another shape the masks, and so the losses with dropout, differ.
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

# Idle OpenMP threads sleep instead of spinning: on a busy or shared CPU spinning
# threads slow every parallel region down several times. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

try:
    import longnet  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import longnet  # noqa: E402
from longnet import data, parallel  # noqa: E402
from longnet.cli import int_list  # noqa: E402
from longnet.model import LongNetConfig, LongNetLM  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", help="file or directory of text to train on (default: the Python stdlib)"
    )
    g.add_argument(
        "--extensions",
        default=".py",
        help="comma-separated file suffixes read from a --data directory",
    )
    g.add_argument(
        "--val-fraction", type=float, default=0.05, help="fraction of files held out for validation"
    )
    g.add_argument(
        "--pack-documents",
        action="store_true",
        help="each file is a document: rows of --seq-len tokens packed with their file "
        "boundaries (cu_seqlens); no attention or target across files",
    )
    g.add_argument(
        "--align-documents",
        type=int,
        metavar="A",
        help="with --pack-documents and sp > 1: a training document that would cross a "
        "sequence-parallel cut starts a multiple of A tokens before it (pad filler, no "
        "targets), so patterns with w dividing A exchange nothing there",
    )
    g.add_argument(
        "--max-train-bytes", type=int, help="read at most about this many training bytes"
    )
    g = p.add_argument_group("model")
    g.add_argument("--seq-len", type=int, default=512)
    g.add_argument("--attention", choices=("dilated", "dense", "sliding"), default="dilated")
    g.add_argument("--segment-lengths", type=int_list, default=[64, 128, 256, 512])
    g.add_argument("--dilation-rates", type=int_list, default=[1, 2, 4, 8])
    g.add_argument(
        "--window",
        type=int,
        help="block size of --attention sliding (default: first segment length)",
    )
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--embed-dim", type=int, default=128)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int)
    g.add_argument("--ffn-dim", type=int, help="default 4 * embed-dim")
    g.add_argument("--norm-style", choices=("pre", "subln"), default="pre")
    g.add_argument("--position-encoding", choices=("rotary", "xpos", "none"), default="rotary")
    g.add_argument("--dropout", type=float, default=0.0)
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=800, help="total optimizer steps")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument(
        "--min-lr-ratio",
        type=float,
        default=0.1,
        help="final learning rate as a fraction of --lr (cosine decay)",
    )
    g.add_argument("--warmup-steps", type=int, default=30)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--eval-interval", type=int, default=50)
    g.add_argument(
        "--eval-windows", type=int, default=32, help="fixed validation windows of --seq-len tokens"
    )
    g.add_argument("--save-interval", type=int, default=100)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("system")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="autocast dtype for the forward (float32 = no autocast; float16: refused, no scaler)",
    )
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--out-dir", default="runs/longnet_lm")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint under OUT_DIR/dcp up to --steps total "
        "(on any mesh: one process or torchrun)",
    )
    parallel.add_parallel_arguments(g)  # --dp, --sp, --sequence-parallel, --timeout
    g.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute every decoder layer in backward (keeps one (B, N, E) "
        "tensor per layer instead of about ten; one more forward)",
    )
    g.add_argument(
        "--chunk-size",
        type=int,
        help="compute the feed-forward and the LM head with the loss over this many "
        "positions at a time, recomputed in backward (no (B, N, vocab) logits, no "
        "feed-forward activations kept); default off",
    )
    g.add_argument(
        "--keep-checkpoints", type=int, default=2, help="checkpoints kept under OUT_DIR/dcp"
    )
    g.add_argument("--no-plot", action="store_true", help="skip loss_curve.png")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def model_config(args: argparse.Namespace) -> LongNetConfig:
    """The model the flags describe; the patterns of ``--attention``."""
    ws, rs = list(args.segment_lengths), list(args.dilation_rates)
    if args.attention != "dilated":
        ws, rs = [args.seq_len if args.attention == "dense" else args.window or ws[0]], [1]
    return LongNetConfig(
        vocab_size=longnet.ByteTokenizer.vocab_size,
        num_layers=args.layers,
        embed_dim=args.embed_dim,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        ffn_dim=args.ffn_dim,
        segment_lengths=ws,
        dilation_rates=rs,
        norm_style=args.norm_style,
        dropout=args.dropout,
        position_encoding=None if args.position_encoding == "none" else args.position_encoding,
    )


def load_data(
    args: argparse.Namespace, log=print, packed: bool = False, cut_every: int | None = None
):
    """Train and validation token streams (uint16 numpy arrays), held out by file (one
    file: its last part); ``packed`` (``--pack-documents``): train and validation
    :class:`longnet.data.PackedRows`, every file one document. ``cut_every``: where
    sequence parallelism cuts each training row (with ``--align-documents``)."""
    if args.data is None:
        root, files = data.stdlib_source_files()
        source = f"Python stdlib .py files under {root}"
    else:
        root = args.data
        exts = tuple(e if e.startswith(".") else "." + e for e in args.extensions.split(",") if e)
        files = data.list_text_files(root, exts)
        if not files:
            raise SystemExit(f"--data {root!r}: no files ending in {exts}")
        source = f"{len(files)} files under {root}"
    rows = f", packed in rows of {args.seq_len}" if packed else ""
    if len(files) == 1:
        tokens = data.encode_files(files)
        cut = int(tokens.size * (1 - args.val_fraction))
        log(f"data: {source}; one file split at byte {cut}{rows}")
        parts = [(tokens[:cut], [0, cut]), (tokens[cut:], [0, tokens.size - cut])]
    elif packed:
        train_files, val_files = data.split_by_file(files, root, args.val_fraction)
        parts = [
            data.encode_documents(train_files, max_bytes=args.max_train_bytes),
            data.encode_documents(val_files),
        ]
        log(
            f"data: {source}; train {len(parts[0][1]) - 1} / validation "
            f"{len(parts[1][1]) - 1} files, each a document{rows}"
        )
    else:
        train_files, val_files = data.split_by_file(files, root, args.val_fraction)
        train = data.encode_files(train_files, max_bytes=args.max_train_bytes)
        val = data.encode_files(val_files)
        log(
            f"data: {source}; train {len(train_files)} files / {train.size:,} tokens, "
            f"validation {len(val_files)} files / {val.size:,} tokens"
        )
        return train, val
    if not packed:
        return parts[0][0], parts[1][0]
    pad = longnet.ByteTokenizer.pad_token_id
    train = parts[0]
    if cut_every is not None and args.align_documents:
        aligned = data.pack_documents(
            *train, args.seq_len, pad, boundary_every=cut_every, align=args.align_documents
        )
        filler = aligned.filler_tokens
        log(
            f"data: training documents aligned to {args.align_documents} tokens before "
            f"the sequence-parallel cuts (every {cut_every:,} tokens of a row): "
            f"{filler:,} filler tokens ({100 * filler / aligned.inputs.numel():.2f}%)"
        )
        return aligned, data.pack_documents(*parts[1], args.seq_len, pad)
    return tuple(data.pack_documents(t, o, args.seq_len, pad) for t, o in parts)


def sequence_parallel_cuts(seq_len: int, batch_size: int, dp: int, sp: int) -> int | None:
    """Where sequence parallelism cuts each packed training row (every that many
    tokens, a divisor of ``seq_len``): a dp rank joins ``batch_size / dp`` rows into
    one and splits it into ``sp`` equal parts. ``None`` when no cut falls inside a
    row (one process, or whole rows per sp rank)."""
    part = batch_size // dp * seq_len // sp
    every = math.gcd(part, seq_len)
    return None if sp == 1 or every == seq_len else every


class LRSchedule:
    """Linear warm-up over ``warmup_steps`` steps, then cosine decay to ``lr *
    min_lr_ratio`` at step ``steps``, constant after. Saved in the checkpoints
    (``state_dict`` / ``load_state_dict``), so a resume continues the curve its run
    was on, whatever ``--steps`` it is given.

    The decay is a list of pieces ``(start, ratio, end)``: from ``ratio`` of ``lr`` at
    step ``start`` down a half cosine to ``min_lr_ratio`` at step ``end`` (first
    ``(warmup_steps, 1.0, steps)``). :meth:`extend` moves the end to another total
    from a resume step: before the decay has begun the curve is exactly that of a run
    started with the new total; after, a new piece starts at the rate the run had
    reached at that step, so the curve never jumps.
    """

    def __init__(self, lr: float, warmup_steps: int, steps: int, min_lr_ratio: float) -> None:
        self.lr, self.warmup_steps, self.min_lr_ratio = float(lr), int(warmup_steps), min_lr_ratio
        self.pieces: list[tuple[int, float, int]] = [(self.warmup_steps, 1.0, int(steps))]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LRSchedule:
        return cls(args.lr, args.warmup_steps, args.steps, args.min_lr_ratio)

    @property
    def steps(self) -> int:
        """The step at which the decay ends."""
        return self.pieces[-1][2]

    def ratio(self, step: int) -> float:
        """The learning rate of ``step`` (0-based) as a fraction of ``lr``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        start, high, end = next(p for p in reversed(self.pieces) if p[0] <= step)
        progress = min(1.0, (step - start) / max(1, end - start))
        low = self.min_lr_ratio
        return low + (high - low) * 0.5 * (1 + math.cos(math.pi * progress))

    def lr_at(self, step: int) -> float:
        return self.lr * self.ratio(step)

    def extend(self, step: int, steps: int) -> None:
        """Make ``steps`` the end of the decay, continuing from ``step`` (the next step
        to run)."""
        start, high, _ = self.pieces[-1]
        if step <= start:
            self.pieces[-1] = (start, high, int(steps))
        else:
            self.pieces.append((step, self.ratio(step), int(steps)))

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "min_lr_ratio": self.min_lr_ratio,
            "pieces": [list(p) for p in self.pieces],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr, self.warmup_steps = state["lr"], state["warmup_steps"]
        self.min_lr_ratio = state["min_lr_ratio"]
        self.pieces = [(int(a), float(b), int(c)) for a, b, c in state["pieces"]]


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to ``lr * min_lr_ratio`` (the curve of a run
    started with ``args``)."""
    return LRSchedule.from_args(args).lr_at(step)


def _resume_schedule(schedule: LRSchedule, step: int, args: argparse.Namespace, log) -> None:
    """Check the command line against the checkpoint's schedule (the warm-up, peak and
    final learning rates must be the same: another curve would jump) and follow a new
    ``--steps``."""
    for name in ("lr", "warmup_steps", "min_lr_ratio"):
        saved, given = getattr(schedule, name), getattr(args, name)
        if saved != given:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(
                f"--resume: {flag} {given} differs from the checkpoint's learning-rate "
                f"schedule ({flag} {saved}); resume with {flag} {saved}, or start a new "
                "run in another --out-dir"
            )
    if args.steps != schedule.steps:
        before, saved_steps = schedule.lr_at(step), schedule.steps
        schedule.extend(step, args.steps)
        log(
            f"note: --steps {args.steps} differs from the checkpoint's {saved_steps}: the "
            f"learning rate continues from {before:.3g} at step {step} and decays to "
            f"{schedule.lr * schedule.min_lr_ratio:.3g} at step {args.steps}"
        )


def save_plot(history: dict[str, list], path: str, title: str) -> bool:
    """Write the train/validation loss curves to ``path`` (False without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if history["train"]:
        steps, losses = zip(*history["train"])
        ax.plot(steps, losses, alpha=0.35, lw=1, label="train (per step)")
        k = max(1, len(losses) // 25)
        if k > 1 and len(losses) > k:
            smooth = [sum(losses[i - k + 1 : i + 1]) / k for i in range(k - 1, len(losses))]
            ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"train ({k}-step mean)")
    if history["val"]:
        steps, losses = zip(*history["val"])
        ax.plot(steps, losses, "o-", lw=2, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build_model(args: argparse.Namespace, device: str, dcp_path: str | None, mesh):
    """``(model, forward model, autocast dtype)``: the checkpoint's model (its weights
    load later) or a new one; under the mesh parallelized (--dtype is FSDP2's
    parameter dtype, gradients reduce in float32: no autocast), on one process with
    checkpointing and ``torch.compile`` as asked."""
    if dcp_path is not None:
        model = LongNetLM(parallel.checkpoint_config(dcp_path), device=device)
    else:
        torch.manual_seed(args.seed)  # the same initial parameters on every rank
        model = LongNetLM(model_config(args), device=device)
    if args.chunk_size is not None:
        if args.chunk_size < 1:
            raise SystemExit(f"--chunk-size must be >= 1, got {args.chunk_size}")
        model.set_chunk_size(args.chunk_size)
    dtype = {"float32": None, "bfloat16": torch.bfloat16}[args.dtype]
    if mesh is None:
        model.set_activation_checkpointing(args.activation_checkpointing)
        return model, (torch.compile(model) if args.compile else model), dtype
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    ac = args.activation_checkpointing
    parallel.parallelize(
        model, mesh, activation_checkpointing=ac, mp_policy=policy, compile=args.compile
    )
    return model, model, None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` says; return the metrics (also written to metrics.json)."""
    try:  # the (dp, sp) degrees (checked once) and the dtype
        dims = parallel.ParallelDims.from_args(args)
        dims.check_batch(args.batch_size, args.seq_len)
        if args.dtype == "float16":  # without a scaler small gradients underflow to zero
            raise ValueError("--dtype float16 needs a gradient scaler: use --dtype bfloat16")
        cuts = sequence_parallel_cuts(args.seq_len, args.batch_size, dims.dp, dims.sp)
        if args.align_documents is not None:
            if not args.pack_documents:
                raise ValueError("--align-documents needs --pack-documents")
            if args.align_documents < 1:
                raise ValueError(f"--align-documents must be >= 1, got {args.align_documents}")
            if cuts is not None and cuts % args.align_documents:
                raise ValueError(
                    f"--align-documents {args.align_documents} must divide the distance "
                    f"between sequence-parallel cuts ({cuts} tokens here)"
                )
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(str(exc)) from None
    mesh = parallel.init_mesh(dims, args.device, timeout=args.timeout)  # None: one process
    device = args.device if mesh is None else parallel.local_device(args.device)
    rank = 0 if mesh is None else mesh.get_rank()
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt_dir = os.path.join(args.out_dir, "checkpoint")
    ckpt = parallel.CheckpointManager(
        os.path.join(args.out_dir, "dcp"),
        keep=args.keep_checkpoints,
        export_dir=ckpt_dir,
        mesh_shape=(dims.dp, dims.sp),
    )
    dcp_path = ckpt.to_resume(args.resume, log)
    if args.resume and dcp_path is None:
        raise SystemExit(f"--resume: no checkpoint at {ckpt.root}")
    args.resume = dcp_path is not None
    model, fwd_model, autocast_dtype = build_model(args, device, dcp_path, mesh)
    logits = args.chunk_size is None  # with chunks: the LM head and loss, no logits
    cfg, n_params = model.config, model.num_parameters()
    on_mesh = f"; mesh dp {dims.dp} x sp {dims.sp} (FSDP2 over {dims.world_size} ranks)"
    log(
        f"model: {n_params:,} parameters, {cfg.num_layers} layers, "
        f"width {cfg.embed_dim}, {cfg.num_heads} heads; attention {args.attention} "
        f"w={cfg.segment_lengths} r={cfg.dilation_rates}; seq_len {args.seq_len}"
        + (on_mesh if mesh is not None else "")
        + ("; activation checkpointing" if args.activation_checkpointing else "")
        + (f"; chunks of {args.chunk_size:,} positions" if args.chunk_size else "")
    )
    if args.align_documents and cuts is None:
        log("--align-documents: no sequence-parallel cut inside a row on this mesh; no effect")
    train_data, val_data = load_data(args, log, packed=args.pack_documents, cut_every=cuts)
    b = args.batch_size
    if args.pack_documents:
        n_val = min(len(val_data), max(1, args.eval_windows))
        val_batches = [
            parallel.local_packed_batch(val_data, range(i, min(i + b, n_val)), mesh)
            for i in range(0, n_val, b)
        ]
    else:
        val_batches = data.eval_batches(val_data, args.seq_len, args.eval_windows, b)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed + 1)
    schedule = LRSchedule.from_args(args)
    history: dict[str, list] = {"train": [], "val": [], "lr": []}
    step, elapsed0 = 0, 0.0
    if dcp_path is None:
        # Dropout masks of their own on every dp row and sp shard (the parameters
        # were initialized from the shared seed).
        parallel.seed_rank(args.seed, mesh)
    else:
        loaded = ckpt.load(dcp_path, model, optimizer, scheduler=schedule)
        state = loaded["extra"]
        log(f"resuming from {dcp_path} at step {state['step']}")
        if not loaded["rng_restored"]:  # another mesh: other masks, not the start's again
            log("note: the checkpoint was written on another mesh: dropout draws other masks")
            parallel.seed_rank(args.seed, mesh, step=state["step"])
        for name in ("seq_len", "batch_size", "seed"):
            if getattr(args, name) != state["args"][name]:
                log(
                    f"note: --{name.replace('_', '-')} {getattr(args, name)} differs from "
                    f"the checkpoint's {state['args'][name]}"
                )
        gen.set_state(state["generator"])
        history, step, elapsed0 = state["history"], state["step"], state.get("elapsed_s", 0.0)
        history.setdefault("lr", [])
        _resume_schedule(schedule, step, args, log)

    eval_kw = {"device": device, "autocast_dtype": autocast_dtype, "return_logits": logits}

    def validate(write=log) -> None:
        loss = parallel.evaluate_loss(fwd_model, val_batches, mesh, **eval_kw)
        history["val"].append((step, loss))
        write(f"step {step}: validation loss {loss:.4f}")

    def train_step() -> float:
        """One optimizer step on the next global batch; its loss, the token-weighted
        mean over the whole global batch (the same on any mesh)."""
        packed = {}
        if args.pack_documents:  # the rows of random_packed_batch, this rank's part
            index = torch.randint(0, len(train_data), (args.batch_size,), generator=gen)
            x, y, cu = parallel.local_packed_batch(train_data, index.tolist(), mesh)
            packed["cu_seqlens"] = cu.to(device)
        else:
            x, y = data.random_batch(train_data, args.batch_size, args.seq_len, gen)
            x, y = (parallel.local_batch(t, mesh) for t in (x, y))
        x, y = x.to(device), y.to(device)
        lr = schedule.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        history["lr"].append((step + 1, lr))
        with torch.autocast(device.split(":")[0], autocast_dtype, autocast_dtype is not None):
            loss, value = parallel.token_mean_loss(
                fwd_model, x, y, mesh, return_logits=logits, **packed
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under the mesh FSDP2 reduce-scatters the gradients
        if args.grad_clip > 0:
            with parallel.phase("the all-reduce of the gradient norm (clipping)"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        return value

    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()
    if step == 0 and not history["val"]:
        validate()
    bar = None
    if rank == 0 and not args.quiet:
        from tqdm import tqdm

        bar = tqdm(
            total=args.steps,
            initial=step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stdout,
        )
    model.train()
    window_t, window_tokens = time.time(), 0
    while step < args.steps:
        try:
            loss_value = train_step()
            step += 1
            if not math.isfinite(loss_value):
                raise SystemExit(f"training diverged at step {step} (loss {loss_value})")
            history["train"].append((step, loss_value))
            window_tokens += args.batch_size * args.seq_len
            if bar is not None:
                rate = window_tokens / max(1e-9, time.time() - window_t)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:,.0f}")
                bar.update(1)
            if step % args.eval_interval == 0 or step == args.steps:
                with parallel.phase("the evaluation's forward"):
                    validate(bar.write if bar is not None else log)
                window_t, window_tokens = time.time(), 0
            if step % args.save_interval == 0 or step == args.steps:
                extra = {"step": step, "generator": gen.get_state(), "history": history}
                extra.update(elapsed_s=elapsed0 + time.time() - t0, args=vars(args))
                with parallel.phase("the sharded checkpoint's collectives (DCP save)"):
                    ckpt.save(step, model, optimizer, scheduler=schedule, extra=extra)
        except RuntimeError as exc:
            if mesh is None:
                raise
            raise RuntimeError(
                f"rank {rank} of {dims.world_size}, step {step + 1}: a collective failed or "
                f"timed out (--timeout {args.timeout:g} s) in {parallel.current_phase()}; "
                f"another rank probably died or hangs. {type(exc).__name__}: {exc}"
            ) from exc
    if bar is not None:
        bar.close()
    elapsed = elapsed0 + time.time() - t0
    ckpt.export()  # under torchrun: the last checkpoint as a save_pretrained directory
    metrics = {
        "steps": step,
        "elapsed_s": round(elapsed, 1),
        "attention": args.attention,
        "segment_lengths": cfg.segment_lengths,
        "dilation_rates": cfg.dilation_rates,
        "seq_len": args.seq_len,
        "pack_documents": bool(args.pack_documents),
        "align_documents": args.align_documents,
        "parameters": n_params,
        "mesh": {"dp": dims.dp, "sp": dims.sp},
        "val_loss_start": history["val"][0][1] if history["val"] else None,
        "val_loss_end": history["val"][-1][1] if history["val"] else None,
        "history": history,
    }
    if rank == 0:
        with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        if not args.no_plot:
            png = os.path.join(args.out_dir, "loss_curve.png")
            title = f"LongNet byte LM ({args.attention}, w={cfg.segment_lengths}, r={cfg.dilation_rates})"
            ok = save_plot(history, png, title)
            log(
                f"loss curve: {png}" if ok else "matplotlib is not installed: no loss curve written"
            )
        log(
            f"done: {step} steps in {elapsed:.0f} s; validation loss "
            f"{metrics['val_loss_start']:.4f} -> {metrics['val_loss_end']:.4f}; "
            f"checkpoint: {ckpt_dir}"
        )
    if mesh is not None:
        parallel.close_process_group()
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
