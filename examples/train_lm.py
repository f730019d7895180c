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

Under torchrun the ranks form a ``(dp, sp)`` device mesh (``longnet.parallel``):
every sequence is split over ``sp`` ranks, the ``--batch-size`` sequences of a step
(the global batch, so one command line is the same run at any mesh) over ``dp``, and
FSDP2 shards parameters, gradients and optimizer state over all ``dp * sp`` ranks.
Checkpoints are ``torch.distributed.checkpoint`` directories under ``OUT_DIR/dcp``
(sharded under torchrun, one process's otherwise) and resume on any mesh, one process
included, so a run started on one machine can continue on many and back; the model is
also exported to ``OUT_DIR/checkpoint`` for ``generate.py``.

``--pack-documents`` trains on each file as its own document: the token stream is
cut into rows of ``--seq-len`` tokens, each row with its file boundaries
(``cu_seqlens``), and a step's rows run as one packed row in which no file attends
to another and positions restart at every file (``LongNetLM(..., cu_seqlens=...)``);
no token predicts the next file's first one. Validation uses packed rows too.

Attention variants (``--attention``), all through the same dilated-attention operator:

* ``dilated``: the given ``--segment-lengths`` / ``--dilation-rates``.
* ``dense``: one pattern ``w = seq_len, r = 1``: ordinary full causal attention.
* ``sliding``: block-local attention, one pattern ``w = --window, r = 1``: each query
  sees the tokens of its own window-sized block up to itself (between 1 and ``window``
  keys; a segment pattern, not a per-query sliding mask).

``--chunk-size N`` computes every layer's feed-forward and the LM head with the loss
over ``N`` positions at a time, each recomputed in backward
(``LongNetLM.set_chunk_size``): with ``--activation-checkpointing`` this is what lets
one process train on a million tokens (``python -m longnet.plan ... --chunk-size N``
counts it).

Outputs under ``--out-dir``: ``checkpoint/`` (``config.json`` and weights, a
``save_pretrained`` directory), ``dcp/step_*`` (the training checkpoints: model,
optimizer, data position, RNG and loss history), ``metrics.json`` and
``loss_curve.png``.
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
from longnet.checkpoint import META_NAME, latest_checkpoint, load_checkpoint  # noqa: E402
from longnet.checkpoint import save_checkpoint as save_sharded  # noqa: E402
from longnet.cli import int_list  # noqa: E402
from longnet.data import (  # noqa: E402
    encode_documents,
    encode_files,
    eval_batches,
    list_text_files,
    pack_documents,
    packed_batch,
    random_batch,
    random_packed_batch,
    split_by_file,
    stdlib_source_files,
)
from longnet.model import LongNetConfig, LongNetLM  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=None,
        help="file or directory of text to train on (default: the Python stdlib)",
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
        "--max-train-bytes",
        type=int,
        default=None,
        help="read at most about this many training bytes",
    )
    g = p.add_argument_group("model")
    g.add_argument("--seq-len", type=int, default=512)
    g.add_argument("--attention", choices=("dilated", "dense", "sliding"), default="dilated")
    g.add_argument("--segment-lengths", type=int_list, default=[64, 128, 256, 512])
    g.add_argument("--dilation-rates", type=int_list, default=[1, 2, 4, 8])
    g.add_argument(
        "--window",
        type=int,
        default=None,
        help="block size of --attention sliding (default: first segment length)",
    )
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--embed-dim", type=int, default=128)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=None)
    g.add_argument("--ffn-dim", type=int, default=None, help="default 4 * embed-dim")
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
        help="autocast dtype for the forward (float32 = no autocast)",
    )
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--out-dir", default="runs/longnet_lm")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint under OUT_DIR/dcp up to --steps total "
        "(on any mesh: one process or torchrun)",
    )
    g.add_argument(
        "--dp",
        type=int,
        default=None,
        help="under torchrun: data-parallel degree (the global --batch-size is "
        "split over it); default WORLD / sp",
    )
    g.add_argument(
        "--sp",
        type=int,
        default=None,
        help="under torchrun: sequence-parallel degree (every sequence is split "
        "over it); default 1",
    )
    g.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="under torchrun: split every sequence across all ranks (--sp WORLD)",
    )
    g.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute every decoder layer in backward (keeps one (B, N, E) "
        "tensor per layer instead of about ten; one more forward)",
    )
    g.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="compute the feed-forward and the LM head with the loss over this many "
        "positions at a time, recomputed in backward (no (B, N, vocab) logits, no "
        "feed-forward activations kept); default off",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="under torchrun: seconds a rank waits for any collective before it "
        "fails, naming the collective (a dead or hung rank)",
    )
    g.add_argument(
        "--keep-checkpoints",
        type=int,
        default=2,
        help="checkpoints kept under OUT_DIR/dcp",
    )
    g.add_argument("--no-plot", action="store_true", help="skip loss_curve.png")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def attention_patterns(args: argparse.Namespace) -> tuple:
    """``(segment_lengths, dilation_rates)`` for ``--attention``."""
    if args.attention == "dense":
        return [args.seq_len], [1]
    if args.attention == "sliding":
        window = args.window or args.segment_lengths[0]
        return [window], [1]
    return list(args.segment_lengths), list(args.dilation_rates)


def model_config(args: argparse.Namespace) -> LongNetConfig:
    ws, rs = attention_patterns(args)
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


def _data_files(args: argparse.Namespace) -> tuple[str, list[str], str]:
    """``(root, files, description)`` of the training text."""
    if args.data is None:
        root, files = stdlib_source_files()
        source = f"Python stdlib .py files under {root}"
    else:
        root = args.data
        exts = tuple(e if e.startswith(".") else "." + e for e in args.extensions.split(",") if e)
        files = list_text_files(root, exts)
        if not files:
            raise SystemExit(f"--data {root!r}: no files ending in {exts}")
        source = f"{len(files)} files under {root}"
    return root, files, source


def load_data(args: argparse.Namespace, log=print):
    """Train and validation token streams (uint16 numpy arrays)."""
    root, files, source = _data_files(args)
    if len(files) == 1:
        # One file: hold out its last part instead of whole files.
        tokens = encode_files(files)
        cut = int(tokens.size * (1 - args.val_fraction))
        train, val = tokens[:cut], tokens[cut:]
        log(f"data: {source}; one file split at byte {cut}")
        return train, val
    train_files, val_files = split_by_file(files, root, args.val_fraction)
    train = encode_files(train_files, max_bytes=args.max_train_bytes)
    val = encode_files(val_files)
    log(
        f"data: {source}; train {len(train_files)} files / {train.size:,} tokens, "
        f"validation {len(val_files)} files / {val.size:,} tokens"
    )
    return train, val


def load_packed_data(args: argparse.Namespace, log=print):
    """``--pack-documents``: train and validation :class:`longnet.data.PackedRows`,
    every file one document (a single file: its train and validation parts)."""
    root, files, source = _data_files(args)
    pad = longnet.ByteTokenizer.pad_token_id
    if len(files) == 1:
        tokens = encode_files(files)
        cut = int(tokens.size * (1 - args.val_fraction))
        parts = [(tokens[:cut], [0, cut]), (tokens[cut:], [0, tokens.size - cut])]
        log(f"data: {source}; one file split at byte {cut}, packed in rows of {args.seq_len}")
    else:
        train_files, val_files = split_by_file(files, root, args.val_fraction)
        parts = [
            encode_documents(train_files, max_bytes=args.max_train_bytes),
            encode_documents(val_files),
        ]
        log(
            f"data: {source}; train {len(parts[0][1]) - 1} / validation "
            f"{len(parts[1][1]) - 1} files, each a document, packed in rows of {args.seq_len}"
        )
    train, val = (pack_documents(t, o, args.seq_len, pad) for t, o in parts)
    return train, val


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to ``lr * min_lr_ratio``."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    progress = min(1.0, progress)
    ratio = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * ratio


class Parallel:
    """The ``(dp, sp)`` mesh under torchrun (``longnet.parallel``); a no-op on one
    process (and with ``args=None``)."""

    def __init__(self, args: argparse.Namespace | None):
        self.rank, self.world, self.mesh = 0, 1, None
        self.dp = self.sp = 1
        self.enabled = False
        if args is None:
            return
        under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        world = int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun else 1
        if args.sequence_parallel and (args.sp not in (None, world) or args.dp not in (None, 1)):
            raise SystemExit(
                f"--sequence-parallel means --dp 1 --sp {world} (all ranks); "
                f"got --dp {args.dp} --sp {args.sp}"
            )
        sp = world if args.sequence_parallel else (args.sp or 1)
        dp = args.dp or (world // sp if world % sp == 0 else 0)
        self.enabled = under_torchrun and (world > 1 or dp * sp > 1)
        if not self.enabled:
            if (args.dp or 1) * sp > 1 or args.sequence_parallel:
                raise SystemExit(
                    "--dp/--sp/--sequence-parallel run under torchrun, e.g. "
                    "torchrun --nproc_per_node=4 examples/train_lm.py --dp 2 --sp 2"
                )
            return
        if dp < 1 or dp * sp != world:
            raise SystemExit(
                f"torchrun started {world} processes but --dp {args.dp or dp} x "
                f"--sp {sp} = {(args.dp or dp) * sp}: choose --dp and --sp with "
                f"dp * sp = {world}"
            )
        if args.seq_len % sp:
            raise SystemExit(f"--seq-len {args.seq_len} must be divisible by --sp {sp}")
        if args.batch_size % dp:
            raise SystemExit(
                f"--batch-size {args.batch_size} (the global batch) must be divisible by --dp {dp}"
            )
        import torch.distributed as dist

        from longnet.parallel import build_mesh

        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        import datetime

        import longnet.distributed as lnd

        timeout = datetime.timedelta(seconds=args.timeout)
        store = {}
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart:
            # After a torchrun restart the store still holds the previous attempt's
            # addresses under the same keys: give this attempt its own key prefix.
            rank = int(os.environ["RANK"])
            agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            base = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                world,
                is_master=not agent and rank == 0,
                timeout=timeout,
            )
            store = {
                "store": dist.PrefixStore(f"longnet-restart-{restart}", base),
                "rank": rank,
                "world_size": world,
            }
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout, **store)
        lnd.set_timeout(args.timeout)
        self.dist = dist
        self.rank, self.world = dist.get_rank(), world
        self.dp, self.sp = dp, sp
        self.mesh = build_mesh(dp, sp, device_type="cuda" if cuda else "cpu", seq_len=args.seq_len)

    def device(self, device: str) -> str:
        if self.enabled and device == "cuda":
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        return device

    def chunk(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's block of a global batch (rows over dp, positions over sp);
        a batch whose rows do not split over dp is computed whole by every dp rank."""
        if not self.enabled:
            return t
        from longnet.parallel import local_batch

        if t.shape[0] % self.dp:
            n = t.shape[1] // self.sp
            s = self.mesh.get_local_rank("sp")
            return t[:, s * n : (s + 1) * n]
        return local_batch(t, self.mesh)

    def sum(self, *values: float) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(
            values, dtype=torch.float64, device="cpu" if self.mesh.device_type == "cpu" else "cuda"
        )
        with _phase("an all-reduce of the loss over the ranks", self):
            self.dist.all_reduce(t)
        return t.tolist()

    def mean(self, value: float) -> float:
        return self.sum(value)[0] / self.world

    def close(self) -> None:
        if self.enabled:
            self.dist.barrier()  # no rank tears down while a peer still communicates
            self.dist.destroy_process_group()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches,
    device: str,
    par: Parallel,
    autocast_dtype: torch.dtype | None,
    return_logits: bool = True,
) -> float:
    """Mean next-token loss (nats per token) over fixed validation batches
    (``return_logits=False``: the LM head and loss in chunks, no logits)."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        if len(batch) == 3:  # --pack-documents: (x, y, cu_seqlens), one process
            x, y, cu = (t.to(device) for t in batch)
            with _autocast(device, autocast_dtype):
                _, loss = model(x, y, cu_seqlens=cu, return_logits=return_logits)
            n = int((y != -100).sum())
            total += float(loss) * n if n else 0.0
            count += n
            continue
        x, y = batch
        x, y = par.chunk(x).to(device), par.chunk(y).to(device)
        with _autocast(device, autocast_dtype):
            _, loss = model(x, y, return_logits=return_logits)
        total += float(loss) * y.numel()
        count += y.numel()
    model.train()
    total, count = par.sum(total, count)
    return total / count


def _phase(name: str, par: Parallel):
    """``longnet.parallel.phase(name)`` under the mesh (names a failed collective)."""
    if not par.enabled:
        import contextlib

        return contextlib.nullcontext()
    from longnet.parallel import phase

    return phase(name)


def _autocast(device: str, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device_type=device.split(":")[0], enabled=False)
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` says; return the metrics (also written to metrics.json)."""
    par = Parallel(args)
    is_main = par.rank == 0
    log = print if is_main else (lambda *a, **k: None)
    device = par.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype
    ]

    ckpt_dir = os.path.join(args.out_dir, "checkpoint")
    dcp_dir = os.path.join(args.out_dir, "dcp")
    dcp_path = None
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if par.enabled and restarts > 0 and not args.resume:
        # torchrun --max-restarts restarted the job after a rank failed: continue
        # from the last checkpoint of this run, if it wrote one.
        args.resume = latest_checkpoint(dcp_dir) is not None
        log(
            f"restart {restarts}: "
            + (
                "resuming from the last checkpoint"
                if args.resume
                else "no checkpoint yet, starting over"
            )
        )
    if args.resume:
        dcp_path = latest_checkpoint(dcp_dir)
        if dcp_path is None:
            raise SystemExit(f"--resume: no checkpoint at {dcp_dir}")
        with open(os.path.join(dcp_path, META_NAME)) as f:
            cfg = LongNetConfig.from_dict(json.load(f)["config"])
        model = LongNetLM(cfg, device=device)
    else:
        torch.manual_seed(args.seed)  # the same initial parameters on every rank
        model = LongNetLM(model_config(args), device=device)
    if args.chunk_size is not None:
        if args.chunk_size < 1:
            raise SystemExit(f"--chunk-size must be >= 1, got {args.chunk_size}")
        model.set_chunk_size(args.chunk_size)
    logits = args.chunk_size is None  # with chunks: the LM head and loss, no logits
    cfg = model.config
    n_params = model.num_parameters()
    fwd_model = model
    if par.enabled:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from longnet.parallel import parallelize

        # Under the mesh --dtype is FSDP2's parameter dtype (gradients reduce in float32).
        policy = MixedPrecisionPolicy(
            param_dtype=autocast_dtype, reduce_dtype=torch.float32 if autocast_dtype else None
        )
        parallelize(
            model,
            par.mesh,
            activation_checkpointing=args.activation_checkpointing,
            mp_policy=policy,
            compile=args.compile,
        )
        autocast_dtype = None
    else:
        model.set_activation_checkpointing(args.activation_checkpointing)
        if args.compile:
            fwd_model = torch.compile(model)
    log(
        f"model: {n_params:,} parameters, {cfg.num_layers} layers, "
        f"width {cfg.embed_dim}, {cfg.num_heads} heads; attention {args.attention} "
        f"w={cfg.segment_lengths} r={cfg.dilation_rates}; seq_len {args.seq_len}"
        + (
            f"; mesh dp {par.dp} x sp {par.sp} (FSDP2 over {par.world} ranks)"
            if par.enabled
            else ""
        )
        + ("; activation checkpointing" if args.activation_checkpointing else "")
        + (f"; chunks of {args.chunk_size:,} positions" if args.chunk_size else "")
    )

    if args.pack_documents:
        if par.enabled:
            raise SystemExit("--pack-documents runs on one process for now (not under torchrun)")
        train_rows, val_rows = load_packed_data(args, log)
        n_val = min(len(val_rows), max(1, args.eval_windows))
        val_batches: list = [
            packed_batch(val_rows, range(i, min(i + args.batch_size, n_val)))
            for i in range(0, n_val, args.batch_size)
        ]
    else:
        train_tokens, val_tokens = load_data(args, log)
        val_batches = eval_batches(val_tokens, args.seq_len, args.eval_windows, args.batch_size)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed + 1)
    history: dict[str, list] = {"train": [], "val": []}
    step, elapsed0 = 0, 0.0
    if dcp_path is not None:
        state = load_checkpoint(dcp_path, model, optimizer)["extra"]
        log(f"resuming from {dcp_path} at step {state['step']}")
        saved = state["args"]
        for name in ("seq_len", "batch_size", "seed"):
            if getattr(args, name) != saved[name]:
                log(
                    f"note: --{name.replace('_', '-')} {getattr(args, name)} differs from "
                    f"the checkpoint's {saved[name]}"
                )
        gen.set_state(state["generator"])
        history = state["history"]
        step, elapsed0 = state["step"], state.get("elapsed_s", 0.0)

    def save_checkpoint() -> None:
        trainer = {
            "step": step,
            "generator": gen.get_state(),
            "history": history,
            "elapsed_s": elapsed0 + time.time() - t0,
            "args": vars(args),
        }
        save_sharded(
            dcp_dir,
            step,
            model,
            optimizer,
            extra=trainer,
            mesh_shape=(par.dp, par.sp),
            keep=args.keep_checkpoints,
        )
        if not par.enabled:
            model.save_pretrained(ckpt_dir)  # for generate.py (torchrun exports at the end)

    if is_main:
        os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()
    if step == 0 and not history["val"]:
        history["val"].append(
            (0, evaluate(fwd_model, val_batches, device, par, autocast_dtype, logits))
        )
        log(f"step 0: validation loss {history['val'][-1][1]:.4f}")

    bar = None
    if is_main and not args.quiet:
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
    tokens_per_step = args.batch_size * args.seq_len
    window_t, window_tokens = time.time(), 0

    def train_step(step: int) -> float:
        """One optimizer step on the next global batch; the mean loss over the ranks."""
        packed: dict[str, torch.Tensor] = {}
        if args.pack_documents:
            x, y, cu = random_packed_batch(train_rows, args.batch_size, gen)
            packed["cu_seqlens"] = cu.to(device)
        else:
            x, y = random_batch(train_tokens, args.batch_size, args.seq_len, gen)
        x, y = par.chunk(x).to(device), par.chunk(y).to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        with _autocast(device, autocast_dtype):
            _, loss = fwd_model(x, y, return_logits=logits, **packed)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under the mesh FSDP2 reduce-scatters the gradients
        if args.grad_clip > 0:
            with _phase("the all-reduce of the gradient norm (clipping)", par):
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        return par.mean(float(loss.detach()))

    def one_step() -> None:
        """A training step, then the evaluation and checkpoint it is due for."""
        nonlocal step, window_t, window_tokens
        loss_value = train_step(step)
        step += 1
        if not math.isfinite(loss_value):
            raise SystemExit(f"training diverged at step {step} (loss {loss_value})")
        history["train"].append((step, loss_value))
        window_tokens += tokens_per_step
        if bar is not None:
            rate = window_tokens / max(1e-9, time.time() - window_t)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:,.0f}")
            bar.update(1)
        if step % args.eval_interval == 0 or step == args.steps:
            with _phase("the evaluation's forward", par):
                val = evaluate(fwd_model, val_batches, device, par, autocast_dtype, logits)
            history["val"].append((step, val))
            msg = f"step {step}: validation loss {val:.4f}"
            if bar is not None:
                bar.write(msg)
            else:
                log(msg)
            window_t, window_tokens = time.time(), 0
        if step % args.save_interval == 0 or step == args.steps:
            with _phase("the sharded checkpoint's collectives (DCP save)", par):
                save_checkpoint()

    while step < args.steps:
        try:
            one_step()
        except RuntimeError as exc:
            if not par.enabled:
                raise
            from longnet.parallel import current_phase

            raise RuntimeError(
                f"rank {par.rank} of {par.world}, step {step + 1}: a collective failed or "
                f"timed out (--timeout {args.timeout:g} s) in {current_phase()}; another "
                f"rank probably died or hangs. {type(exc).__name__}: {exc}"
            ) from exc
    if bar is not None:
        bar.close()
    elapsed = elapsed0 + time.time() - t0
    if par.enabled:
        # One process turns the last sharded checkpoint into a save_pretrained
        # directory (for generate.py) while the others wait.
        from longnet.checkpoint import export_pretrained

        par.dist.barrier()
        if is_main:
            export_pretrained(latest_checkpoint(dcp_dir), ckpt_dir)

    metrics = {
        "steps": step,
        "elapsed_s": round(elapsed, 1),
        "attention": args.attention,
        "segment_lengths": cfg.segment_lengths,
        "dilation_rates": cfg.dilation_rates,
        "seq_len": args.seq_len,
        "pack_documents": bool(args.pack_documents),
        "parameters": n_params,
        "mesh": {"dp": par.dp, "sp": par.sp},
        "val_loss_start": history["val"][0][1] if history["val"] else None,
        "val_loss_end": history["val"][-1][1] if history["val"] else None,
        "history": history,
    }
    if is_main:
        with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        if not args.no_plot:
            png = os.path.join(args.out_dir, "loss_curve.png")
            title = (
                f"LongNet byte LM ({args.attention}, w={cfg.segment_lengths}, "
                f"r={cfg.dilation_rates})"
            )
            if save_plot(history, png, title):
                log(f"loss curve: {png}")
            else:
                log("matplotlib is not installed: no loss curve written")
        log(
            f"done: {step} steps in {elapsed:.0f} s; validation loss "
            f"{metrics['val_loss_start']:.4f} -> {metrics['val_loss_end']:.4f}; "
            f"checkpoint: {ckpt_dir}"
        )
    par.close()
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    main()
