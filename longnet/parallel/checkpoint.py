"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory ``ROOT/step_NNNNNNNN`` holding

* the DCP files of the model and optimizer state (every rank writes its own shards;
  ``get_state_dict`` / ``set_state_dict`` of ``torch.distributed.checkpoint.state_dict``
  turn FSDP2's DTensors into plain names, so a checkpoint loads on any mesh shape or
  world size and DCP reshards it);
* ``trainer_state.pt`` (rank 0): the scheduler, the caller's ``extra`` (the data
  position, e.g. a ``torch.Generator`` state and the loss history);
* ``rng/dp<d>_sp<s>.pt`` (every rank): the rank's CPU generator state and, where CUDA
  is in use, its device's, keyed by the rank's ``(dp, sp)`` mesh coordinates
  (``d = rank // sp``, ``s = rank % sp``); a resume on a mesh of the same shape
  restores every rank's own states (dropout draws then continue bit for bit), one on
  another mesh restores none (:func:`~longnet.parallel.seed_rank` reseeds there);
* ``longnet_checkpoint.json`` (rank 0, written last): the model config, the step,
  the mesh it was written on. A directory without it is an unfinished write and is
  ignored by :func:`latest_checkpoint`.

:class:`CheckpointManager` is what a training script uses: the checkpoint to resume
(asked for, or after an elastic restart; rank 0 lists the directory and broadcasts
its choice), saving with the newest ``keep`` kept, and
the final ``save_pretrained`` export. Functions: :func:`save_checkpoint`,
:func:`load_checkpoint`, :func:`latest_checkpoint`
(collective on every rank of a job, or plain single-process calls without a process
group) and :func:`export_pretrained` (one process, no process group: a
:meth:`~longnet.model.LongNetLM.save_pretrained` directory from a sharded
checkpoint), also ``python -m longnet.parallel.checkpoint export CKPT OUT``.
:func:`checkpoint_config` reads the model configuration a checkpoint was written for.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from longnet.model import LongNetConfig, LongNetLM

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "export_pretrained",
    "checkpoint_step",
    "checkpoint_config",
    "CheckpointManager",
]

META_NAME = "longnet_checkpoint.json"
TRAINER_NAME = "trainer_state.pt"
RNG_DIR = "rng"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_FORMAT = 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _one_process_quiet() -> Iterator[None]:
    """DCP warns on every call without a process group that it assumes one process;
    these calls mean exactly that (``no_dist``), so the warning is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_layout(mesh_shape: Sequence[int] | None) -> tuple[tuple[int, int], str]:
    """``((dp, sp), file name)`` of this rank's generator states: the coordinates of
    rank ``r`` are ``(r // sp, r % sp)``; without ``mesh_shape`` every rank is a
    ``dp`` rank (``sp = 1``)."""
    world = dist.get_world_size() if _distributed() else 1
    sp = 1 if mesh_shape is None else int(mesh_shape[1])
    if sp < 1 or world % sp:
        raise ValueError(f"mesh_shape {tuple(mesh_shape or ())} does not fit {world} ranks")
    rank = _rank()
    return (world // sp, sp), f"dp{rank // sp}_sp{rank % sp}.pt"


def _rng_state() -> dict[str, Any]:
    """This process's CPU generator state and its CUDA device's (when CUDA is in use)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if cuda else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _param_dtype(model: LongNetLM) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


def checkpoint_step(path: str) -> int:
    """The step a checkpoint directory was written at (from its metadata)."""
    return int(_read_meta(path)["step"])


def checkpoint_config(path: str) -> LongNetConfig:
    """The :class:`~longnet.model.LongNetConfig` of the model checkpoint ``path`` holds."""
    from longnet.model import LongNetConfig

    return LongNetConfig.from_dict(_read_meta(path)["config"])


def _read_meta(path: str) -> dict[str, Any]:
    meta_path = os.path.join(path, META_NAME)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"{path!r} is not a finished longnet checkpoint (no {META_NAME}); pass a "
            "directory written by longnet.parallel.save_checkpoint, or its root to "
            "latest_checkpoint()"
        )
    with open(meta_path) as f:
        return json.load(f)


def latest_checkpoint(root: str) -> str | None:
    """The finished checkpoint with the highest step under ``root`` (None if none)."""
    if not os.path.isdir(root):
        return None
    best = None
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, META_NAME)):
            if best is None or int(m.group(1)) > best[0]:
                best = (int(m.group(1)), os.path.join(root, name))
    return None if best is None else best[1]


def _state(model: LongNetLM, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_checkpoint(
    root: str,
    step: int,
    model: LongNetLM,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
    mesh_shape: Sequence[int] | None = None,
    keep: int | None = None,
) -> str:
    """Write ``ROOT/step_<step>`` and return its path. Collective: every rank calls it.

    Args:
        root: directory of the run's checkpoints.
        step: optimizer steps done (names the directory).
        model, optimizer: the (possibly FSDP2-sharded) model and its optimizer.
        scheduler: anything with ``state_dict()`` / ``load_state_dict()``.
        extra: picklable values to restore on resume (rank 0's are saved): the data
            position, loss history, ...
        mesh_shape: ``(dp, sp)`` of the job: keys every rank's generator states by
            its mesh coordinates (None: ``(world, 1)``), and is recorded.
        keep: keep only the newest ``keep`` finished checkpoints under ``root``.
    """
    import torch.distributed.checkpoint as dcp

    if not hasattr(model, "config"):
        raise TypeError(f"save_checkpoint expects a LongNetLM, got {type(model).__name__}")
    rng_mesh, rng_file = _rng_layout(mesh_shape)
    path = os.path.join(root, f"step_{int(step):08d}")
    if _rank() == 0:
        os.makedirs(os.path.join(path, RNG_DIR), exist_ok=True)
        stale = os.path.join(path, META_NAME)
        if os.path.exists(stale):
            os.remove(stale)  # rewritten below once the new state is complete
    _barrier()
    # Every rank's own generator states, before DCP's collectives (which every rank
    # passes before rank 0 writes the metadata below).
    torch.save(_rng_state(), os.path.join(path, RNG_DIR, rng_file))
    with _one_process_quiet():
        dcp.save(_state(model, optimizer), checkpoint_id=path, no_dist=not _distributed())
    if _rank() == 0:
        torch.save(
            {
                "scheduler": None if scheduler is None else scheduler.state_dict(),
                "extra": extra or {},
            },
            os.path.join(path, TRAINER_NAME),
        )
        meta = {
            "format": _FORMAT,
            "step": int(step),
            "config": model.config.to_dict(),
            "dtype": _param_dtype(model),
            "has_optimizer": optimizer is not None,
            "world_size": dist.get_world_size() if _distributed() else 1,
            "mesh_shape": None if mesh_shape is None else list(mesh_shape),
            "rng_mesh": list(rng_mesh),
        }
        tmp = os.path.join(path, META_NAME + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(path, META_NAME))
        if keep is not None:
            _prune(root, int(keep))
    _barrier()
    return path


def _prune(root: str, keep: int) -> None:
    import shutil

    done = sorted(
        (int(m.group(1)), n)
        for n in os.listdir(root)
        if (m := _STEP_DIR.match(n)) and os.path.isfile(os.path.join(root, n, META_NAME))
    )
    for _, name in done[: max(0, len(done) - max(1, keep))]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _check_same_model(path: str, meta: dict[str, Any], model: LongNetLM) -> None:
    """Raise a ``ValueError`` naming the fields where ``model``'s config differs from
    the one the checkpoint ``path`` was written for."""
    saved, mine = meta["config"], model.config.to_dict()
    diff = [
        f"{k}: checkpoint {saved.get(k)!r}, model {mine.get(k)!r}"
        for k in sorted(set(saved) | set(mine))
        if saved.get(k) != mine.get(k)
    ]
    if diff:
        raise ValueError(
            f"the checkpoint {path!r} was written for another model ("
            + "; ".join(diff)
            + "). Build the model from the checkpoint's config "
            f"(LongNetConfig.from_dict of {META_NAME}'s 'config') or start a new run "
            "in another directory."
        )


def load_checkpoint(
    path: str,
    model: LongNetLM,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: Any = None,
    restore_rng: bool = True,
    mesh_shape: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Load ``path`` (a ``step_*`` directory) into ``model`` / ``optimizer`` /
    ``scheduler`` in place, on any mesh; collective. Returns ``{"step", "extra",
    "meta", "rng_restored"}``.

    ``restore_rng``: every rank restores the generator states its mesh coordinates
    saved (``mesh_shape``: this job's ``(dp, sp)``, None: ``(world, 1)``) when the
    checkpoint was written on a mesh of the same shape; on another mesh nothing is
    restored (``rng_restored`` False: seed the ranks, e.g. with
    :func:`~longnet.parallel.seed_rank`), since no rank there draws the masks of a
    saved rank.

    Raises:
        FileNotFoundError: ``path`` is not a finished checkpoint.
        ValueError: the checkpoint holds another model (the differing config fields
            are named) or no optimizer state while ``optimizer`` is given.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    meta = _read_meta(path)
    _check_same_model(path, meta, model)
    if optimizer is not None and not meta.get("has_optimizer", False):
        raise ValueError(
            f"the checkpoint {path!r} holds no optimizer state; pass "
            "optimizer=None to load the model alone"
        )
    state = _state(model, optimizer)
    with _one_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    trainer = torch.load(os.path.join(path, TRAINER_NAME), map_location="cpu", weights_only=False)
    if scheduler is not None and trainer["scheduler"] is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    restored = False
    if restore_rng:
        rng_mesh, rng_file = _rng_layout(mesh_shape)
        own = os.path.join(path, RNG_DIR, rng_file)
        if meta.get("rng_mesh") == list(rng_mesh) and os.path.isfile(own):
            _set_rng_state(torch.load(own, map_location="cpu", weights_only=False))
            restored = True
        elif "rng" in trainer and meta.get("world_size") == 1 == rng_mesh[0] * rng_mesh[1]:
            torch.set_rng_state(trainer["rng"])  # written by one process before RNG_DIR
            restored = True
    return {
        "step": int(meta["step"]),
        "extra": trainer["extra"],
        "meta": meta,
        "rng_restored": restored,
    }


def export_pretrained(path: str, out_dir: str, *, dtype: torch.dtype | None = None):
    """Write the model of checkpoint ``path`` as a ``save_pretrained`` directory
    (one process, no process group needed) and return the :class:`LongNetLM`."""
    import torch.distributed.checkpoint as dcp

    from longnet.model import LongNetConfig, LongNetLM

    meta = _read_meta(path)
    model = LongNetLM(LongNetConfig.from_dict(meta["config"]))
    model.to(getattr(torch, meta.get("dtype", "float32")))
    state = {"model": model.state_dict()}
    with _one_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=True)
    model.load_state_dict(state["model"])
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(out_dir)
    return model


class CheckpointManager:
    """The checkpoints of one training run under ``root`` (collective methods: every
    rank of the job calls them, or one process without a process group).

    Args:
        root: directory of the ``step_*`` checkpoints.
        keep: the newest checkpoints kept (None: all).
        export_dir: where the model is also written as a ``save_pretrained``
            directory: after every save on one process, by :meth:`export` (rank 0,
            from the last checkpoint) under a process group.
        mesh_shape: recorded in every checkpoint (e.g. ``(dp, sp)``).
    """

    def __init__(
        self,
        root: str,
        *,
        keep: int | None = None,
        export_dir: str | None = None,
        mesh_shape: Sequence[int] | None = None,
    ):
        self.root, self.keep, self.export_dir = root, keep, export_dir
        self.mesh_shape = None if mesh_shape is None else tuple(mesh_shape)

    def to_resume(self, resume: bool, log=print) -> str | None:
        """The checkpoint to continue from: the last one when ``resume`` (None if
        there is none); after a ``torchrun --max-restarts`` restart of a job the last
        one as well, if the run wrote one (``log`` says which).

        Under a process group rank 0 lists ``root`` and broadcasts its answer (a
        collective when ``resume`` or after a restart): every rank resumes the same
        step even where a shared file system shows the ranks different listings.
        """
        from longnet.parallel.launch import restart_count

        restarts = restart_count()
        after_restart = not resume and restarts > 0 and _distributed()
        if not resume and not after_restart:
            return None
        found = self._latest_on_rank_zero()
        if after_restart:
            log(
                f"restart {restarts}: "
                + (
                    "resuming from the last checkpoint"
                    if found
                    else "no checkpoint yet, starting over"
                )
            )
        return found

    def _latest_on_rank_zero(self) -> str | None:
        """:func:`latest_checkpoint` of ``root`` as rank 0 sees it, on every rank."""
        found = latest_checkpoint(self.root) if _rank() == 0 else None
        if _distributed():
            box: list[str | None] = [found]
            dist.broadcast_object_list(box, src=0)
            found = box[0]
        return found

    def save(
        self,
        step: int,
        model: LongNetLM,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        scheduler: Any = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """:func:`save_checkpoint` of ``step`` (and, on one process, the export)."""
        path = save_checkpoint(
            self.root,
            step,
            model,
            optimizer,
            scheduler=scheduler,
            extra=extra,
            mesh_shape=self.mesh_shape,
            keep=self.keep,
        )
        if self.export_dir is not None and not _distributed():
            model.save_pretrained(self.export_dir)
        return path

    def load(
        self,
        path: str,
        model: LongNetLM,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        scheduler: Any = None,
    ) -> dict[str, Any]:
        """:func:`load_checkpoint` of ``path`` on this job's mesh (every rank's own
        generator states restored when the mesh has the checkpoint's shape)."""
        return load_checkpoint(
            path, model, optimizer, scheduler=scheduler, mesh_shape=self.mesh_shape
        )

    def export(self) -> None:
        """Under a process group: rank 0 turns the last checkpoint into the
        ``save_pretrained`` directory while the others wait (one process exports at
        every save)."""
        if self.export_dir is None or not _distributed():
            return
        dist.barrier()
        if _rank() == 0:
            latest = latest_checkpoint(self.root)
            if latest is None:
                raise FileNotFoundError(f"no finished checkpoint under {self.root!r} to export")
            export_pretrained(latest, self.export_dir)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m longnet.parallel.checkpoint",
        description="Inspect or export longnet DCP checkpoints.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write a save_pretrained directory from a checkpoint")
    e.add_argument("checkpoint", help="a step_* directory, or a run's checkpoint root")
    e.add_argument("out_dir")
    args = p.parse_args(argv)
    path = args.checkpoint
    if not os.path.isfile(os.path.join(path, META_NAME)):
        found = latest_checkpoint(path)
        path = found if found is not None else path
    export_pretrained(path, args.out_dir)
    print(f"exported {path} (step {checkpoint_step(path)}) to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
