"""Data x sequence parallel training (longnet.parallel: DeviceMesh, FSDP2, activation
checkpointing) against one process training on the same global batches.

Each scenario spawns gloo processes on 127.0.0.1 with a bounded join; the workers
write a JSON report that the tests read. The single-process reference runs in the
test process.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_distributed import _worker as rank_worker
from test_distributed import spawn_ranks

SPAWN_TIMEOUT_S = 240
STEPS = 20
GLOBAL_BATCH, SEQ_LEN = 4, 32
MESHES = [(2, 2), (1, 4), (4, 1)]
HALF = 3  # the checkpoint test trains 2 * HALF steps, interrupted after HALF


def _config(**kw):
    from longnet.model import LongNetConfig

    # Segments of 16 and 32 cross the chunks of 8 positions at sp = 4, those of 32
    # the chunks of 16 at sp = 2: every sp > 1 mesh exchanges rows.
    base = dict(
        num_layers=2,
        embed_dim=16,
        num_heads=2,
        ffn_dim=32,
        segment_lengths=[4, 8, 16, 32],
        dilation_rates=[1, 2, 4, 4],
    )
    base.update(kw)
    return LongNetConfig(**base)


def _model(dtype, seed=0, **kw):
    from longnet.model import LongNetLM

    torch.manual_seed(seed)
    return LongNetLM(_config(**kw)).to(dtype)


def _batches(steps, seed=1, start=0):
    """The global batches of steps [start, start + steps): (x, y) pairs."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(start + steps):
        ids = torch.randint(0, 256, (GLOBAL_BATCH, SEQ_LEN + 1), generator=gen)
        if i >= start:
            out.append((ids[:, :-1], ids[:, 1:]))
    return out


def _optimizer(model):
    """AdamW and a linear warm-up (so a resumed run needs the scheduler's state)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))


def _train(model, opt, batches, mesh=None):
    """Train on ``batches``; the losses are global means (over the mesh). A model with
    a chunk size (``set_chunk_size``) computes its loss without logits."""
    opt, sched = opt
    from longnet.parallel import local_batch, mean_over_mesh

    losses = []
    for x, y in batches:
        if mesh is not None:
            x, y = local_batch(x, mesh), local_batch(y, mesh)
        _, loss = model(x, y, return_logits=getattr(model, "chunk_size", None) is None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        losses.append(value if mesh is None else mean_over_mesh(value, mesh))
    return losses


# ------------------------------------------------------------------ scenarios


def _scenario_meshes(rank, world, report):
    """20 steps at every mesh shape, float64 with and without activation
    checkpointing, float32 without."""
    from longnet.parallel import build_mesh, parallelize

    batches = _batches(STEPS)
    for dp, sp in MESHES:
        mesh = build_mesh(dp, sp, seq_len=SEQ_LEN)
        for dtype, ac in ((torch.float64, False), (torch.float64, True), (torch.float32, False)):
            model = parallelize(_model(dtype), mesh, activation_checkpointing=ac)
            losses = _train(model, _optimizer(model), batches, mesh)
            report[f"{dp}x{sp}-{str(dtype)[6:]}-ac{int(ac)}"] = losses


def _scenario_exchanges(rank, world, report):
    """Collectives of the sequence-parallel path in one training step, without and
    with activation checkpointing (which repeats each layer's forward exchange)."""
    import longnet.parallel as lnp
    from longnet.parallel import build_mesh, parallelize

    mesh = build_mesh(1, 4, seq_len=SEQ_LEN)
    for ac in (False, True):
        model = parallelize(_model(torch.float64), mesh, activation_checkpointing=ac)
        lnp.reset_comm_stats()
        opt = _optimizer(model)
        _train(model, opt, _batches(1), mesh)
        stats = lnp.comm_stats()
        report[f"exchange-calls-ac{int(ac)}"] = stats.calls
        report[f"exchange-sent-ac{int(ac)}"] = stats.bytes_sent
    # The backward exchange started where its output arrived (overlapping the local
    # patterns' backward) or where it began: the same arithmetic, bit for bit.
    for overlap in (True, False):
        lnp.set_backward_overlap(overlap)
        m = parallelize(_model(torch.float64), mesh)
        report[f"overlap{int(overlap)}-losses"] = _train(m, _optimizer(m), _batches(2), mesh)
    lnp.set_backward_overlap(True)
    # Feed-forward and loss in chunks of 3 positions (dividing neither the 16 local
    # positions nor the batch) under FSDP2 and checkpointing at dp=2 x sp=2.
    chunked = _model(torch.float64)
    chunked.set_chunk_size(3)
    square = build_mesh(2, 2, seq_len=SEQ_LEN)
    chunked = parallelize(chunked, square, activation_checkpointing=True)
    report["chunked-losses"] = _train(chunked, _optimizer(chunked), _batches(4), square)
    # What FSDP2 keeps on this rank: parameter shards and AdamW's two moments.
    report["param_elements"] = sum(p.to_local().numel() for p in model.parameters())
    report["adam_elements"] = sum(
        st[k].to_local().numel() for st in opt[0].state.values() for k in ("exp_avg", "exp_avg_sq")
    )


def _scenario_errors(rank, world, report):
    """Bad setups raise at the start with a message naming the fix."""
    from torch.distributed.device_mesh import init_device_mesh

    from longnet.parallel import build_mesh, mesh_shape, parallelize

    errors = {}
    for name, call in (
        ("world", lambda: build_mesh(3, 1)),
        ("seq_len", lambda: build_mesh(2, 2, seq_len=31)),
        (
            "dims",
            lambda: parallelize(
                _model(torch.float64), init_device_mesh("cpu", (4,), mesh_dim_names=("x",))
            ),
        ),
        ("dp_value", lambda: build_mesh(0, 4)),
    ):
        try:
            call()
            errors[name] = None
        except (ValueError, RuntimeError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    mesh = build_mesh(2, 2)
    assert mesh_shape(mesh) == (2, 2)
    report["errors"] = errors

    # Mixed precision through FSDP2's policy: bfloat16 compute, float32 shards.
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = parallelize(
        _model(torch.float32),
        mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    )
    x, y = (local_batch_of(t, mesh) for t in _batches(1)[0])
    logits, loss = model(x, y)
    loss.backward()
    report["mp"] = {
        "logits": str(logits.dtype),
        "loss": mean_of(loss, mesh),
        "shards": sorted({str(p.dtype) for p in model.parameters()}),
        "grads": sorted({str(p.grad.dtype) for p in model.parameters()}),
    }


def local_batch_of(t, mesh):
    from longnet.parallel import local_batch

    return local_batch(t, mesh)


def mean_of(loss, mesh):
    from longnet.parallel import mean_over_mesh

    return mean_over_mesh(float(loss.detach()), mesh)


def _scenario_save(rank, world, report):
    """dp=2 x sp=2: train the first half of the run and write a checkpoint."""
    from longnet.parallel import build_mesh, parallelize, save_checkpoint

    mesh = build_mesh(2, 2, seq_len=SEQ_LEN)
    model = parallelize(_model(torch.float64), mesh, activation_checkpointing=True)
    opt = _optimizer(model)
    report["losses"] = _train(model, opt, _batches(HALF), mesh)
    save_checkpoint(
        os.path.join(report["dir"], "ckpt"),
        HALF,
        model,
        opt[0],
        scheduler=opt[1],
        extra={"next_batch": HALF},
        mesh_shape=(2, 2),
    )


def _scenario_resume(rank, world, report):
    """dp=1 x sp=2: resume the latest checkpoint and train the second half."""
    from longnet.parallel import (
        build_mesh,
        latest_checkpoint,
        load_checkpoint,
        parallelize,
        save_checkpoint,
    )

    mesh = build_mesh(1, 2, seq_len=SEQ_LEN)
    # Another init (everything must come from the checkpoint); checkpointing and
    # torch.compile (aot_eager: no code generation, seconds) under sequence parallelism.
    model = parallelize(
        _model(torch.float64, seed=123), mesh, activation_checkpointing=True, compile="aot_eager"
    )
    opt = _optimizer(model)
    root = os.path.join(report["dir"], "ckpt")
    state = load_checkpoint(latest_checkpoint(root), model, opt[0], scheduler=opt[1])
    start = state["extra"]["next_batch"]
    report["step"] = state["step"]
    report["losses"] = _train(model, opt, _batches(2 * HALF - start, start=start), mesh)
    save_checkpoint(
        root,
        2 * HALF,
        model,
        opt[0],
        scheduler=opt[1],
        extra={"next_batch": 2 * HALF},
        mesh_shape=(1, 2),
    )


_RENDEZVOUS_ERRORS = ("DistNetworkError", "Address already in use", "Connection reset")


def _spawn(world, scenarios, tmp_path):
    """Run ``scenarios`` on ``world`` gloo ranks; the reports. A rendezvous that
    fails because another process took the free port is retried once."""
    try:
        return _spawn_once(world, scenarios, tmp_path)
    except _Rendezvous:
        return _spawn_once(world, scenarios, tmp_path)


class _Rendezvous(Exception):
    pass


def _spawn_once(world, scenarios, tmp_path):
    # test_distributed's rank worker runs this file's scenarios by module name.
    names = [f"test_parallel:_scenario_{name}" for name in scenarios]
    reports = spawn_ranks(rank_worker, world, names, tmp_path, SPAWN_TIMEOUT_S)
    for rank, rep in enumerate(reports):
        assert rep is not None, f"rank {rank} wrote no report: it died"
    failed = [rep["exception"] for rep in reports if "exception" in rep]
    if (
        failed
        and any(e in failed[0] for e in _RENDEZVOUS_ERRORS)
        and "init_process_group" in failed[0]
    ):
        raise _Rendezvous(failed[0])
    assert not failed, failed[0]
    return reports


# ---------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def mesh_reports(tmp_path_factory):
    return _spawn(4, ["meshes", "exchanges", "errors"], tmp_path_factory.mktemp("meshes"))


@pytest.fixture(scope="module")
def reference():
    """Single-process losses on the same global batches (float64 and float32)."""
    torch.set_num_threads(1)
    batches = _batches(STEPS)
    out = {}
    for dtype in (torch.float64, torch.float32):
        model = _model(dtype)
        out[dtype] = _train(model, _optimizer(model), batches)
    return out


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"dp{m[0]}xsp{m[1]}")
@pytest.mark.parametrize("ac", [False, True], ids=["no-ac", "ac"])
def test_float64_mesh_training_matches_one_process(mesh_reports, reference, mesh, ac):
    """Same losses to 1e-9 for 20 steps. Catches: attention not given the sp group
    (each rank would see only its chunk), gradients not reduced over sp or over dp,
    a wrong block of the batch, the mean of the loss taken over the wrong ranks, and
    a recomputed forward that differs from the first one."""
    ref = reference[torch.float64]
    for rep in mesh_reports:
        got = rep[f"{mesh[0]}x{mesh[1]}-float64-ac{int(ac)}"]
        assert len(got) == STEPS
        err = max(abs(a - b) for a, b in zip(got, ref))
        assert err < 1e-9, (rep["rank"], err, got, ref)


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"dp{m[0]}xsp{m[1]}")
def test_float32_mesh_training_within_reduction_order_error(mesh_reports, reference, mesh):
    """float32: a run that sums in another order is another float32 evaluation of the
    same exact training run; its distance to the exact (float64) losses is of the
    size of the single-process float32 run's own distance delta_t to them. So the
    distributed float32 losses must lie within 2 * max_t delta_t of the float64
    losses, plus 8 float32 ulps of the loss as a floor for steps where delta_t
    happens to vanish. (A run missing the sp exchange is off by ~1e-2.)"""
    ref64, ref32 = reference[torch.float64], reference[torch.float32]
    delta = max(abs(a - b) for a, b in zip(ref32, ref64))
    eps = torch.finfo(torch.float32).eps
    bound = 2 * delta + 8 * eps * max(ref64)
    for rep in mesh_reports:
        got = rep[f"{mesh[0]}x{mesh[1]}-float32-ac0"]
        err = max(abs(a - b) for a, b in zip(got, ref64))
        assert err <= bound, (rep["rank"], err, bound, delta)


def test_activation_checkpointing_repeats_the_forward_exchange(mesh_reports):
    """With checkpointing each layer's forward exchange runs again in backward: one
    more collective per layer (2 layers), nothing else changes. Catches a flag that
    does not recompute (same count) and a recompute that skips the exchange."""
    layers = _config().num_layers
    for rep in mesh_reports:
        plain, ac = rep["exchange-calls-ac0"], rep["exchange-calls-ac1"]
        assert plain == 2 * layers  # forward + backward exchange per layer
        assert ac == plain + layers, (plain, ac)


def test_bad_setups_fail_with_the_fix(mesh_reports):
    errors = mesh_reports[0]["errors"]
    assert errors["world"] and "dp x sp = 3 x 1 = 3" in errors["world"]
    assert "world has 4 ranks" in errors["world"]
    assert errors["seq_len"] and "31 must be divisible by sp = 2" in errors["seq_len"]
    assert errors["dims"] and "missing ['dp', 'sp']" in errors["dims"]
    assert errors["dp_value"] and "dp must be an int >= 1" in errors["dp_value"]


def test_mixed_precision_policy_computes_in_bfloat16(mesh_reports, reference):
    """bfloat16 parameters in forward and backward, float32 shards and gradients
    (catches a policy that is not applied). The loss is computed in float32 from
    bfloat16 logits; 0.05 is under two bfloat16 ulps at 5.6 (0.031 each), far above
    the ~1e-3 that rounding the small initial weights moves it, and catches a
    policy that casts the wrong tensors (garbage logits)."""
    for rep in mesh_reports:
        mp = rep["mp"]
        assert mp["logits"] == "torch.bfloat16"
        assert mp["shards"] == ["torch.float32"] and mp["grads"] == ["torch.float32"]
        assert abs(mp["loss"] - reference[torch.float64][0]) < 0.05


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A run written at dp=2 x sp=2 after HALF steps and resumed at dp=1 x sp=2."""
    tmp = tmp_path_factory.mktemp("ckpt")
    first = _spawn(4, ["save"], tmp)
    second = _spawn(2, ["resume"], tmp)
    return tmp, first, second


def test_checkpoint_resumes_on_another_mesh_with_the_same_losses(resumed, reference):
    """Model, optimizer and scheduler state (and the data position) come back on a
    mesh of another shape and world size: the resumed run continues the
    uninterrupted single-process losses to 1e-9; the resumed run also checkpoints
    activations and compiles its layers. Catches a missing optimizer or
    scheduler state (the warm-up lr of step HALF differs), unsharded loading that
    keeps the new model's random init, and a data position that restarts at 0."""
    ref = reference[torch.float64]
    _, first, second = resumed
    for rep in first:
        assert max(abs(a - b) for a, b in zip(rep["losses"], ref[:HALF])) < 1e-9
    for rep in second:
        assert rep["step"] == HALF
        got = rep["losses"]
        assert len(got) == HALF
        assert max(abs(a - b) for a, b in zip(got, ref[HALF : 2 * HALF])) < 1e-9, (got, ref)


def test_export_pretrained_from_sharded_checkpoint(resumed, tmp_path):
    """One process, no process group: the sharded checkpoint of the resumed run
    becomes a save_pretrained directory whose model is the one-process model after
    the same 2 * HALF steps (logits to 1e-9; a wrong or partial shard is off by the
    size of an update, ~1e-3)."""
    from longnet.model import LongNetLM
    from longnet.parallel import checkpoint_step, export_pretrained, latest_checkpoint

    ckpt = latest_checkpoint(os.path.join(str(resumed[0]), "ckpt"))
    assert checkpoint_step(ckpt) == 2 * HALF
    exported = export_pretrained(ckpt, str(tmp_path / "hf"))
    loaded = LongNetLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float64)
    # What was written is the exported model's state (float64 kept in the file;
    # from_pretrained builds a float32 model first, so compare at float32).
    for name, t in exported.state_dict().items():
        assert t.dtype == torch.float64
        torch.testing.assert_close(loaded.state_dict()[name], t, rtol=2e-7, atol=1e-7)
    torch.set_num_threads(1)
    model = _model(torch.float64)
    _train(model, _optimizer(model), _batches(2 * HALF))
    x = _batches(1, seed=5)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=0, atol=1e-9)


def test_resuming_another_model_fails_with_a_clear_message(resumed):
    from longnet.parallel import latest_checkpoint, load_checkpoint

    ckpt = latest_checkpoint(os.path.join(str(resumed[0]), "ckpt"))
    other = _model(torch.float64, embed_dim=32)
    with pytest.raises(ValueError, match=r"another model \(embed_dim: checkpoint 16, model 32"):
        load_checkpoint(ckpt, other)
    with pytest.raises(FileNotFoundError, match="not a finished longnet checkpoint"):
        load_checkpoint(str(resumed[0]), other)


def _saved_in_layers(model, x, y):
    """Bytes autograd's saved-tensor hooks see stored from inside the decoder layers'
    forwards (parameters excluded); then runs the backward."""
    params = {p.data_ptr() for p in model.parameters()}
    total, inside = [0], [0]
    hooks = []
    for layer in model.decoder.layers:
        hooks.append(layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, 1)))
        hooks.append(layer.register_forward_hook(lambda *a: inside.__setitem__(0, 0)))

    def pack(t):
        if inside[0] and t.data_ptr() not in params:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    for h in hooks:
        h.remove()
    loss.backward()
    return total[0]


def test_activation_checkpointing_keeps_less_and_compiles():
    """One process: a checkpointed layer keeps only its input (the recomputation's
    own saves happen in backward), so the forward keeps far less; gradients equal
    the plain ones, also through torch.compile(fullgraph=True) of every layer
    (aot_eager). Catches a flag that keeps everything and a recomputation that
    changes the result."""
    torch.set_num_threads(1)
    x, y = _batches(1)[0]
    model = _model(torch.float64)
    plain = _saved_in_layers(model, x, y)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_activation_checkpointing(True)
    assert model.activation_checkpointing
    ac = _saved_in_layers(model, x, y)
    # A plain layer keeps about ten (B, N, E) tensors (and FFN-wide ones); a
    # checkpointed one keeps exactly its input, one (B, N, E) float64 tensor.
    b, n, e = x.shape[0], x.shape[1], _config().embed_dim
    layers = _config().num_layers
    assert plain >= 10 * layers * b * n * e * 8, plain
    assert ac == layers * b * n * e * 8, ac
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-12, atol=1e-14)
    model.zero_grad()
    for layer in model.decoder.layers:
        layer.compile(backend="aot_eager", fullgraph=True)
    _, loss = model(x, y)
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------- longnet.plan


def _saved_storage_bytes(model, x, y):
    """Bytes of the distinct storages autograd saves inside the decoder layers'
    forwards (parameters excluded): what the layers keep for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, inside = {}, [0]
    hooks = []
    for layer in model.decoder.layers:
        hooks.append(layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, 1)))
        hooks.append(layer.register_forward_hook(lambda *a: inside.__setitem__(0, 0)))

    def pack(t):
        st = t.untyped_storage()
        if inside[0] and st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y)
    for h in hooks:
        h.remove()
    return sum(seen.values())


@pytest.mark.parametrize(
    "kw",
    [
        dict(dtype=torch.float64),
        dict(dtype=torch.float32, num_heads=4, num_kv_heads=2, ffn_dim=48),
        dict(dtype=torch.float32, norm_style="subln", position_encoding=None),
    ],
    ids=["float64", "float32-gqa", "subln-no-rope"],
)
@pytest.mark.parametrize("ac", [False, True], ids=["no-ac", "ac"])
@pytest.mark.parametrize("chunk", [None, 8], ids=["whole", "ffn-chunks"])
def test_plan_layer_activation_bytes_equal_what_autograd_keeps(kw, ac, chunk):
    """longnet.plan's per-layer activation memory is exactly the storages autograd
    keeps inside the layers (one process, dropout off). Catches a formula that
    misses a tensor (the FFN's, the norms' statistics, rotary tables, GQA's smaller
    k/v), checkpointing that keeps more than the layer input, and a chunked
    feed-forward that still keeps its hidden activations or its LayerNorm's."""
    from longnet.plan import layer_activation_bytes

    kw = dict(kw)
    dtype = kw.pop("dtype")
    torch.set_num_threads(1)
    model = _model(dtype, **kw)
    model.set_activation_checkpointing(ac)
    model.set_chunk_size(chunk)
    x, y = _batches(1)[0]
    got = _saved_storage_bytes(model, x, y)
    want = model.config.num_layers * layer_activation_bytes(
        model.config,
        GLOBAL_BATCH,
        SEQ_LEN,
        dtype=str(dtype)[6:],
        activation_checkpointing=ac,
        chunked_ffn=chunk is not None,
    )
    assert got == want, (got, want)


def test_plan_training_matches_fsdp_shards_and_exchange_bytes(mesh_reports):
    """At dp=1 x sp=4: every rank's FSDP2 parameter shard and AdamW state have the
    sizes longnet.plan computes for that rank, the busiest rank's shard is the
    plan's per-rank memory, and the dilated exchange sends what the plan says in a
    training step, with checkpointing one forward exchange more. Catches a plan that
    shards over dp alone, ignores dim-0 padding, or misses the repeated exchange."""
    from longnet.plan import fsdp_shard_elements, plan_training

    cfg = _config()
    for rep in mesh_reports:
        assert rep["param_elements"] == fsdp_shard_elements(cfg, 4, rep["rank"])
        assert rep["adam_elements"] == 2 * rep["param_elements"]
    for ac in (False, True):
        plan = plan_training(
            cfg,
            batch=GLOBAL_BATCH,
            seq_len=SEQ_LEN,
            dp=1,
            sp=4,
            dtype="float64",
            activation_checkpointing=ac,
        )
        assert plan.param_bytes_per_rank == 8 * max(r["param_elements"] for r in mesh_reports)
        assert plan.optimizer_bytes_per_rank == 2 * plan.param_bytes_per_rank
        sent = max(r[f"exchange-sent-ac{int(ac)}"] for r in mesh_reports)
        assert plan.sp_bytes_per_step == sent, (ac, plan.sp_bytes_per_step, sent)
        # Ring attention passes every chunk's k and v to all other ranks: more than
        # the dilated exchange, which sends only the rows of rank-crossing segments.
        assert plan.ring_bytes_per_step > plan.sp_bytes_per_step > 0


def test_plan_training_rejects_bad_meshes():
    from longnet.plan import plan_training

    with pytest.raises(ValueError, match="batch .* divisible by dp"):
        plan_training(_config(), batch=3, seq_len=32, dp=2)
    with pytest.raises(ValueError, match="seq_len .* divisible by sp"):
        plan_training(_config(), batch=4, seq_len=30, sp=4)


@pytest.mark.parametrize("chunk", [None, 5])
def test_plan_cli_prints_the_training_plan(capsys, chunk):
    """python -m longnet.plan --embed-dim ... --dp [--chunk-size] adds the training
    plan (JSON): the plan_training of the same run (a flag not passed on would give
    the other chunk setting's plan, whose activations differ)."""
    from longnet.plan import main, plan_training

    cfg = _config()
    main(
        [
            "--tokens",
            str(SEQ_LEN),
            "--ranks",
            "2",
            "--heads",
            "2",
            "--head-dim",
            "8",
            "--embed-dim",
            "16",
            "--ffn-dim",
            "32",
            "--layers",
            "2",
            "--dtype",
            "float64",
            "--segment-lengths",
            *map(str, cfg.segment_lengths),
            "--dilation-rates",
            *map(str, cfg.dilation_rates),
            "--causal",
            "--batch",
            "2",
            "--dp",
            "2",
            "--activation-checkpointing",
            "--json",
            *(["--chunk-size", str(chunk)] if chunk else []),
        ]
    )
    got = json.loads(capsys.readouterr().out)["training"]
    run = dict(batch=4, seq_len=SEQ_LEN, dp=2, sp=2, dtype="float64", activation_checkpointing=True)
    want = plan_training(cfg, chunk_size=chunk, **run).to_dict()
    other = plan_training(cfg, chunk_size=None if chunk else 5, **run).to_dict()
    assert got == json.loads(json.dumps(want))
    assert got != json.loads(json.dumps(other))
    assert got["dp"] == 2 and got["sp"] == 2 and got["sp_bytes_per_step"] > 0


def test_backward_overlap_changes_no_result(mesh_reports, reference):
    """longnet.parallel.set_backward_overlap(False) restores the exchange's
    backward at the place it began; both orders give identical losses, equal to the
    one-process ones (catches a reverse exchange launched with the wrong sizes or
    gradient, or waited on twice)."""
    for rep in mesh_reports:
        assert rep["overlap1-losses"] == rep["overlap0-losses"]
        assert (
            max(abs(a - b) for a, b in zip(rep["overlap1-losses"], reference[torch.float64][:2]))
            < 1e-9
        )


def test_chunked_feed_forward_and_loss_under_the_mesh(mesh_reports, reference):
    """LongNetLM.set_chunk_size + return_logits=False sharded by FSDP2 with
    checkpointing at dp=2 x sp=2: the one-process (unchunked) losses to 1e-9 for 4
    steps (catches a chunk loss reading a sharded or stale LM-head weight, or chunks
    that skip or repeat local positions)."""
    for rep in mesh_reports:
        got, want = rep["chunked-losses"], reference[torch.float64][:4]
        assert len(got) == 4 and max(abs(a - b) for a, b in zip(got, want)) < 1e-9, (got, want)


# ------------------------------------------- evaluation over rows that do not split


def _eval_batches():
    """Validation batches of 6, 2 and 4 rows (the last two do not split over dp = 3),
    with some ignored targets (-100) so that the mean is token-weighted."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for rows in (6, 2, 4):
        ids = torch.randint(0, 256, (rows, SEQ_LEN + 1), generator=gen)
        x, y = ids[:, :-1], ids[:, 1:].clone()
        y[0, : SEQ_LEN // 2] = -100
        out.append((x, y))
    return out


def _scenario_eval_uneven(rank, world, report):
    """evaluate_loss at dp = 3 x sp = 1 over batches whose rows do not split over dp."""
    from longnet.parallel import build_mesh, evaluate_loss, parallelize

    mesh = build_mesh(3, 1, seq_len=SEQ_LEN)
    model = parallelize(_model(torch.float64), mesh)
    report["eval"] = evaluate_loss(model, _eval_batches(), mesh)


def _scenario_resume_decision(rank, world, report):
    """CheckpointManager.to_resume where ranks 1 and 2 see other listings of the
    checkpoint root (a shared file system that has not shown them the newest
    checkpoint, or shows them one rank 0 does not see): every rank must resume what
    rank 0 found."""
    import longnet.parallel.checkpoint as ckpt_mod
    from longnet.parallel import CheckpointManager

    root = os.path.join(report["dir"], "dcp")
    if rank == 0:
        for step in (2, 4):
            os.makedirs(os.path.join(root, f"step_{step:08d}"))
            with open(os.path.join(root, f"step_{step:08d}", ckpt_mod.META_NAME), "w") as f:
                f.write("{}")
    else:
        seen = {1: os.path.join(root, "step_00000002"), 2: os.path.join(root, "step_00000006")}
        ckpt_mod.latest_checkpoint = lambda _root: seen[rank]
    manager = CheckpointManager(root)
    report["resume"] = manager.to_resume(True, log=lambda *a: None)
    report["fresh"] = manager.to_resume(False, log=lambda *a: None)
    os.environ["TORCHELASTIC_RESTART_COUNT"] = "1"
    report["restart"] = manager.to_resume(False, log=lambda *a: None)
    report["missing"] = CheckpointManager(root + "-none").to_resume(True, log=lambda *a: None)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return _spawn(3, ["eval_uneven", "resume_decision"], tmp_path_factory.mktemp("three"))


def test_evaluation_with_rows_that_do_not_split_over_dp_equals_one_process(three_ranks):
    """The validation loss is the token-weighted mean over the global batch: a batch of
    2 or 4 rows at dp = 3 counts once, not once per dp rank (float64, to 1e-12)."""
    from longnet.parallel import evaluate_loss

    ref = evaluate_loss(_model(torch.float64), _eval_batches())
    for rep in three_ranks:
        assert abs(rep["eval"] - ref) < 1e-12 * ref, (rep["rank"], rep["eval"], ref)


def test_rank_zero_decides_which_checkpoint_every_rank_resumes(three_ranks):
    """Rank 0 lists the checkpoint root and every rank follows it, also ranks whose own
    listing shows an older or a newer checkpoint (they would load another step, or
    wait in another collective until the timeout); a fresh start lists nothing, an
    elastic restart resumes rank 0's, and a root where rank 0 finds none is None on
    every rank."""
    last = os.path.join(three_ranks[0]["dir"], "dcp", "step_00000004")
    for rep in three_ranks:
        assert rep["resume"] == last, (rep["rank"], rep["resume"])
        assert rep["fresh"] is None
        assert rep["restart"] == last, (rep["rank"], rep["restart"])
        assert rep["missing"] is None, (rep["rank"], rep["missing"])
