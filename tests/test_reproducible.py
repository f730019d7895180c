"""A training run as a function of its data and seed: the same loss and gradients on
any (dp, sp) mesh (token-weighted over the global batch, with ignored targets and
empty shards), dropout masks of their own on every rank, and resumes that continue
the learning-rate curve and, on the same mesh, every rank's generators bit for bit.

The mesh scenarios run on 4 gloo ranks spawned once (test_distributed's worker, as
tests/test_parallel.py does); float64 throughout, so that equality with one process
is exact up to the order of the sums.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from test_distributed import _worker as rank_worker
from test_distributed import spawn_ranks
from test_parallel import GLOBAL_BATCH, SEQ_LEN, _batches, _model, _optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPAWN_TIMEOUT_S = 240
LOSS_MESHES = [(2, 2), (1, 4), (4, 1)]
DROPOUT = dict(dropout=0.2, attention_dropout=0.1)
HALF = 2  # the dropout resume trains 2 * HALF steps, interrupted after HALF


def _ignored_targets(y):
    """``y`` with ignored targets such that at dp=2 x sp=2 rank (1, 1) and at dp=1 x
    sp=4 rank 3 have no counted target at all, and every other rank a different
    count (dp=4 x sp=1 included): a rank's own mean would be 0 / 0 there and unequal
    counts would weigh its tokens wrong."""
    y = y.clone()
    y[:, 3 * SEQ_LEN // 4 :] = -100
    y[GLOBAL_BATCH // 2 :, SEQ_LEN // 2 :] = -100
    y[0, :5] = -100
    y[1, 7:9] = 256  # the model's padding id: not counted either
    return y


# ------------------------------------------------------------------ scenarios


def _scenario_loss_and_gradients(rank, world, report):
    """token_mean_loss on three meshes: its value and every parameter's full gradient
    against one process's mean loss and its gradient on the whole batch."""
    from longnet.parallel import build_mesh, local_batch, parallelize, token_mean_loss

    x, y = _batches(1)[0]
    y = _ignored_targets(y)
    plain = _model(torch.float64)
    _, want = plain(x, y)
    want.backward()
    want_grads = {n: p.grad for n, p in plain.named_parameters()}
    out = {}
    for dp, sp in LOSS_MESHES:
        mesh = build_mesh(dp, sp, seq_len=SEQ_LEN)
        model = parallelize(_model(torch.float64), mesh)
        xl, yl = local_batch(x, mesh), local_batch(y, mesh)
        loss, value = token_mean_loss(model, xl, yl, mesh)
        loss.backward()
        err = 0.0
        for n, p in model.named_parameters():
            g = p.grad.full_tensor()
            scale = want_grads[n].abs().max().item()
            err = max(err, (g - want_grads[n]).abs().max().item() / max(scale, 1e-300))
        out[f"{dp}x{sp}"] = {
            "value": value,
            "want": want.item(),
            "grad_rel_err": err,
            "local_counted": int(model.count_targets(yl)),
            "finite": bool(torch.isfinite(loss).item()),
        }
    report["loss"] = out


def _scenario_dropout_masks(rank, world, report):
    """After seed_rank every rank of a dp=2 x sp=2 mesh draws its own dropout mask;
    seeding again draws the same one."""
    import torch.distributed as dist

    from longnet.parallel import build_mesh, seed_rank

    mesh = build_mesh(2, 2, seq_len=SEQ_LEN)
    masks = []
    for _ in range(2):
        seed_rank(0, mesh)
        masks.append(F.dropout(torch.ones(256), 0.5, training=True) != 0)
    everyone = [torch.zeros(256, dtype=torch.bool) for _ in range(world)]
    dist.all_gather(everyone, masks[0])
    report["masks_repeat"] = bool(torch.equal(masks[0], masks[1]))
    report["masks_distinct"] = [
        [bool(torch.equal(everyone[a], everyone[b])) for b in range(world)] for a in range(world)
    ]


def _train_with_dropout(model, opt, batches, mesh):
    from longnet.parallel import local_batch, token_mean_loss

    opt, sched = opt
    losses = []
    for x, y in batches:
        loss, value = token_mean_loss(model, local_batch(x, mesh), local_batch(y, mesh), mesh)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(value)
    return losses


def _scenario_resume_dropout(rank, world, report):
    """dp=2 x sp=2 with dropout and activation checkpointing: 2 * HALF steps straight,
    and HALF steps, a checkpoint, scrambled generators and another model, a resume and
    HALF more. Then a load on a mesh of another shape, which must not restore."""
    from longnet.parallel import (
        CheckpointManager,
        build_mesh,
        parallelize,
        seed_rank,
    )

    mesh = build_mesh(2, 2, seq_len=SEQ_LEN)
    batches = _batches(2 * HALF)

    def fresh(seed=0):
        model = parallelize(
            _model(torch.float64, seed=seed, **DROPOUT), mesh, activation_checkpointing=True
        )
        return model, _optimizer(model)

    model, opt = fresh()
    seed_rank(0, mesh)
    report["straight"] = _train_with_dropout(model, opt, batches, mesh)

    manager = CheckpointManager(os.path.join(report["dir"], "dcp"), mesh_shape=(2, 2))
    model, opt = fresh()
    seed_rank(0, mesh)
    first = _train_with_dropout(model, opt, batches[:HALF], mesh)
    manager.save(HALF, model, opt[0], scheduler=opt[1])
    torch.manual_seed(1234 + rank)  # whatever the generators held is lost
    model, opt = fresh(seed=123)
    loaded = manager.load(manager.to_resume(True), model, opt[0], scheduler=opt[1])
    report["restored"] = loaded["rng_restored"]
    report["resumed"] = first + _train_with_dropout(model, opt, batches[HALF:], mesh)
    # The same files read as a dp=1 x sp=4 job: no rank there drew a saved rank's masks.
    other = CheckpointManager(manager.root, mesh_shape=(1, 4))
    model, opt = fresh()
    report["restored_on_other_mesh"] = other.load(manager.to_resume(True), model, opt[0])[
        "rng_restored"
    ]


PACKED_MESHES = [(2, 2), (1, 4)]
# Rows of two packed rows per step (index 4: a row of padding only). At dp2 x sp2 a
# dp rank holds one row (two shards of 16), at dp1 x sp4 the two rows are split in
# four: documents cross sp ranks, and the padding row fills whole shards.
PACKED_STEPS = [[0, 4], [4, 1], [2, 3], [3, 0]]


def _packed_rows():
    """Synthetic documents (lengths 0 to 40) packed into rows of SEQ_LEN, plus a row
    of padding only (targets all ignored)."""
    import numpy as np

    from longnet.data import PackedRows, pack_documents

    lengths = [5, 40, 0, 3, 17, 30, 9, 1, 12, 6]
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, 256, (sum(lengths),), generator=gen).numpy()
    rows = pack_documents(tokens, np.cumsum([0, *lengths]), SEQ_LEN, 256)
    return PackedRows(
        torch.cat([rows.inputs, torch.full((1, SEQ_LEN), 256)]),
        torch.cat([rows.targets, torch.full((1, SEQ_LEN), -100)]),
        [*rows.cu_seqlens, torch.tensor([0, SEQ_LEN])],
    )


def _train_packed(model, opt, mesh):
    from longnet.parallel import local_packed_batch, token_mean_loss

    rows, (opt, sched), losses = _packed_rows(), opt, []
    for index in PACKED_STEPS:
        x, y, cu = local_packed_batch(rows, index, mesh)
        loss, value = token_mean_loss(model, x, y, mesh, cu_seqlens=cu)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(value)
    return losses


def _scenario_packed(rank, world, report):
    """Packed training (documents crossing sp ranks, a shard of padding only) on two
    meshes and in one process, float64; the counted targets of this rank per step;
    and the evaluation of a last batch with fewer rows than dp."""
    from longnet.parallel import (
        build_mesh,
        evaluate_loss,
        local_packed_batch,
        parallelize,
    )

    model = _model(torch.float64)
    report["packed_one_process"] = _train_packed(model, _optimizer(model), None)
    rows = _packed_rows()
    val = [[0, 1, 2], [3]]  # the last batch: one row for two dp ranks
    report["packed_eval_one_process"] = evaluate_loss(
        _model(torch.float64), [local_packed_batch(rows, i, None) for i in val]
    )
    for dp, sp in PACKED_MESHES:
        mesh = build_mesh(dp, sp, seq_len=SEQ_LEN)
        model = parallelize(_model(torch.float64), mesh, activation_checkpointing=True)
        report[f"packed-{dp}x{sp}"] = _train_packed(model, _optimizer(model), mesh)
        report[f"packed-counted-{dp}x{sp}"] = [
            int((local_packed_batch(rows, i, mesh)[1] != -100).sum()) for i in PACKED_STEPS
        ]
        model = parallelize(_model(torch.float64), mesh)
        batches = [local_packed_batch(rows, i, mesh) for i in val]
        report[f"packed-eval-{dp}x{sp}"] = evaluate_loss(model, batches, mesh)


def _spawn(world, scenarios, tmp_path):
    """Run this file's ``scenarios`` on ``world`` gloo ranks; the reports. A
    rendezvous that fails because another process took the free port is retried."""
    names = [f"test_reproducible:_scenario_{name}" for name in scenarios]
    for attempt in range(2):
        reports = spawn_ranks(rank_worker, world, names, tmp_path, SPAWN_TIMEOUT_S)
        for r, rep in enumerate(reports):
            assert rep is not None, f"rank {r} wrote no report: it died"
        failed = [rep["exception"] for rep in reports if "exception" in rep]
        if attempt == 0 and failed and "init_process_group" in failed[0]:
            continue
        assert not failed, failed[0]
        return reports
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _spawn(
        4,
        ["loss_and_gradients", "dropout_masks", "resume_dropout", "packed"],
        tmp_path_factory.mktemp("reproducible"),
    )


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("mesh", LOSS_MESHES, ids=lambda m: f"dp{m[0]}xsp{m[1]}")
def test_training_loss_and_gradients_are_one_process_token_mean(four_ranks, mesh):
    """token_mean_loss gives one process's mean loss over the global batch and, after
    FSDP2's reduction, one process's gradient of it, with a rank holding no counted
    target (dp2 x sp2, dp1 x sp4) and ranks with unequal counts (all three). The
    per-rank mean loss that the training step used before is 0 / 0 = NaN on the
    empty rank (the step's reported loss, the mean over ranks, is then NaN) and
    weighs the tokens of ranks with fewer counted targets more: its gradients were
    off by 0.52 (dp2 x sp2) and 0.23 (dp4 x sp1) of the largest entry on this batch.
    float64: the sums run in another order
    over at most 128 tokens and 4 ranks, so errors are a few hundred ulps (1e-13
    relative); 1e-10 relative to the largest gradient entry leaves room, while the
    weighting error is of the order of the count ratios."""
    key = f"{mesh[0]}x{mesh[1]}"
    counted = [rep["loss"][key]["local_counted"] for rep in four_ranks]
    if mesh != (4, 1):
        assert 0 in counted, counted  # the case the test is about
    assert len(set(counted)) > 1, counted
    for rep in four_ranks:
        got = rep["loss"][key]
        assert got["finite"]
        assert abs(got["value"] - got["want"]) <= 1e-12 * got["want"], (rep["rank"], got)
        assert got["grad_rel_err"] <= 1e-10, (rep["rank"], got)


def test_every_rank_draws_its_own_dropout_masks(four_ranks):
    """seed_rank derives each rank's seed from its (dp, sp) coordinates: the four
    ranks of dp2 x sp2 draw four different masks (before, every rank was seeded alike
    and every shard and row drew the same mask), and reseeding repeats a rank's own."""
    for rep in four_ranks:
        assert rep["masks_repeat"]
        same = rep["masks_distinct"]
        for a in range(4):
            for b in range(4):
                assert same[a][b] == (a == b), (a, b, same)


def test_resume_with_dropout_is_bit_for_bit_on_the_same_mesh(four_ranks):
    """A dp2 x sp2 run with dropout (and activation checkpointing) resumed from its
    checkpoint, after the generators were scrambled and another model built, has the
    losses of the uninterrupted run exactly: every rank restores its own generator
    state (restoring rank 0's on every rank, as before, gives the other ranks rank
    0's masks). On a mesh of another shape nothing is restored."""
    for rep in four_ranks:
        assert rep["restored"] is True
        assert rep["resumed"] == rep["straight"], (rep["rank"], rep["resumed"], rep["straight"])
        assert rep["restored_on_other_mesh"] is False


@pytest.mark.parametrize("mesh", PACKED_MESHES, ids=lambda m: f"dp{m[0]}xsp{m[1]}")
def test_packed_training_on_a_mesh_equals_one_process(four_ranks, mesh):
    """local_packed_batch + token_mean_loss: packed documents on dp2 x sp2 and dp1 x
    sp4 (activation checkpointing on) train with one process's losses for 4 steps,
    float64 to 1e-9 as test_parallel's meshes, with documents that cross sp ranks and
    shards holding only padding (whose own mean loss would be 0 / 0); the validation
    loss of packed batches, the last with fewer rows than dp, too (1e-12 relative).
    Catches rows split over dp without their own boundaries, boundaries not those of
    the whole packed row, and a dp rank without rows that skips the forward (FSDP2's
    parameter gathers would hang)."""
    key = f"{mesh[0]}x{mesh[1]}"
    counted = [c for rep in four_ranks for c in rep[f"packed-counted-{key}"]]
    assert 0 in counted, counted  # a shard of padding only
    for rep in four_ranks:
        want = rep["packed_one_process"]
        got = rep[f"packed-{key}"]
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-9, (rep["rank"], got, want)
        ev, ev_want = rep[f"packed-eval-{key}"], rep["packed_eval_one_process"]
        assert abs(ev - ev_want) <= 1e-12 * ev_want, (rep["rank"], ev, ev_want)


# ------------------------------------------------- the learning-rate schedule


def _train_lm():
    spec = importlib.util.spec_from_file_location(
        "train_lm_under_test", os.path.join(ROOT, "examples", "train_lm.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = [
    *("--seq-len", "64", "--segment-lengths", "16,32,64", "--dilation-rates", "1,2,4"),
    *("--layers", "1", "--embed-dim", "32", "--heads", "2", "--batch-size", "2"),
    *("--eval-windows", "2", "--max-train-bytes", "300000", "--threads", "1"),
    *("--warmup-steps", "2", "--dropout", "0.1", "--quiet", "--no-plot"),
]


def test_schedule_extend_continues_the_curve():
    """LRSchedule: extending the total before the decay begins gives exactly the curve
    of a run started with the new total; after, the curve continues from the rate it
    had reached (no jump) and ends at the minimum; the state round-trips."""
    LRSchedule = _train_lm().LRSchedule
    long = LRSchedule(1.0, 2, 10, 0.1)
    early = LRSchedule(1.0, 2, 4, 0.1)
    early.extend(2, 10)
    assert [early.lr_at(s) for s in range(12)] == [long.lr_at(s) for s in range(12)]
    late = LRSchedule(1.0, 2, 4, 0.1)
    before = [late.lr_at(s) for s in range(4)]
    late.extend(3, 10)
    after = [late.lr_at(s) for s in range(3, 12)]
    assert after[0] == LRSchedule(1.0, 2, 4, 0.1).lr_at(3)
    assert all(a >= b for a, b in zip(after, after[1:])) and after[-1] == pytest.approx(0.1)
    assert [late.lr_at(s) for s in range(3)] == before[:3]
    copy = LRSchedule(5.0, 1, 1, 0.5)
    copy.load_state_dict(late.state_dict())
    assert [copy.lr_at(s) for s in range(12)] == [late.lr_at(s) for s in range(12)]


def test_train_lm_resume_continues_the_learning_rate_curve(tmp_path):
    """train_lm.py with dropout, 4 steps, checkpoints at 3 and 4. Resumed at step 3
    with the same --steps: the learning rates and training losses of steps 4 are the
    uninterrupted run's, bit for bit (the schedule and the generator states come from
    the checkpoint). Resumed at step 3 with --steps 8: the rate continues from where
    the run was and decays to the minimum at 8, never rising (before, lr_at
    recomputed the curve from --steps: 3e-3 * 0.55 at step 4 became 3e-3 * 0.93).
    Another --lr is refused, naming the fix."""
    tl = _train_lm()
    first = str(tmp_path / "first")
    common = [*TINY, "--save-interval", "3", "--eval-interval", "100"]
    want = tl.main([*common, "--steps", "4", "--out-dir", first])["history"]

    def resumed(name, *args):
        out = str(tmp_path / name)
        shutil.copytree(first, out)
        shutil.rmtree(os.path.join(out, "dcp", "step_00000004"))
        return tl.main([*common, "--out-dir", out, "--resume", *args])["history"]

    same = resumed("same", "--steps", "4")
    assert same["lr"] == want["lr"] and same["train"] == want["train"], (same, want)
    longer = resumed("longer", "--steps", "8")["lr"]
    assert longer[:3] == want["lr"][:3] and len(longer) == 8
    rates = [lr for _, lr in longer]
    assert rates[3] == want["lr"][3][1]  # step 4 keeps the rate of the run it resumes
    assert all(a >= b for a, b in zip(rates[2:], rates[3:])), rates
    curve = tl.LRSchedule(3e-3, 2, 4, 0.1)
    curve.extend(3, 8)
    assert rates == [curve.lr_at(s) for s in range(8)]
    assert curve.lr_at(8) == pytest.approx(3e-3 * 0.1)
    with open(os.path.join(first, "metrics.json")) as f:
        assert json.load(f)["history"]["lr"] == [list(e) for e in want["lr"]]
    with pytest.raises(SystemExit, match="--lr 0.001 differs .* resume with --lr 0.003"):
        resumed("other-lr", "--steps", "8", "--lr", "1e-3")


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")
def test_train_lm_pack_documents_under_torchrun_has_one_process_losses(tmp_path):
    """train_lm.py --pack-documents at --dp 2 --sp 2 (refused under torchrun before):
    the training and validation losses of one process running the same command line,
    within 16 float32 ulps of losses < 8 (the sums run in another order; measured:
    about 1 ulp). A rank packing the wrong rows or losing the boundaries is off by
    > 1e-3."""
    from test_examples import TINY as EXAMPLE_TINY
    from test_examples import _run, _torchrun

    args = ["--pack-documents", "--steps", "3", "--eval-interval", "3"]
    one, mesh = str(tmp_path / "one"), str(tmp_path / "mesh")
    _run("train_lm.py", *EXAMPLE_TINY, *args, "--out-dir", one, "--quiet", "--no-plot")
    proc = _torchrun(4, *args, "--out-dir", mesh, "--dp", "2", "--sp", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = []
    for d in (one, mesh):
        with open(os.path.join(d, "metrics.json")) as f:
            runs.append(json.load(f))
    assert runs[1]["mesh"] == {"dp": 2, "sp": 2} and runs[1]["pack_documents"] is True
    bound = 16 * float(torch.finfo(torch.float32).eps) * 8
    for key in ("train", "val"):
        want, got = runs[0]["history"][key], runs[1]["history"][key]
        assert [s for s, _ in got] == [s for s, _ in want] and got
        assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) <= bound, (key, got, want)
