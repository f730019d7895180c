"""Tests of the LongNet decoder LM, its KV-cached generation, persistence, tokenizer
and data helpers."""

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longnet.data import encode_files, eval_batches, random_batch, split_by_file
from longnet.model import LongNetConfig, LongNetLM
from longnet.tokenizer import ByteTokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread avoids OpenMP overhead on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**kw) -> LongNetConfig:
    args = dict(
        num_layers=2,
        embed_dim=32,
        num_heads=4,
        num_kv_heads=2,
        ffn_dim=64,
        segment_lengths=[4, 8, 16],
        dilation_rates=[1, 2, 4],
    )
    args.update(kw)
    return LongNetConfig(**args)


def tiny_model(dtype=torch.float64, seed=0, **kw) -> LongNetLM:
    torch.manual_seed(seed)
    return LongNetLM(tiny_config(**kw)).to(dtype).eval()


def test_config_defaults_validation_and_round_trip():
    cfg = tiny_config(ffn_dim=None, num_kv_heads=None)
    assert cfg.ffn_dim == 128 and cfg.num_kv_heads == 4 and cfg.head_dim == 8
    assert LongNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="norm_style"):
        tiny_config(norm_style="post")
    with pytest.raises(ValueError, match="embed_dim"):
        tiny_config(embed_dim=30)
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny_config(num_kv_heads=3)
    with pytest.raises(ValueError, match="dilation_rates"):
        tiny_config(dilation_rates=[1, 2])
    with pytest.raises(ValueError, match="unknown LongNetConfig fields"):
        LongNetConfig.from_dict({"vocab": 3})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_shapes_dtypes_and_loss(dtype):
    model = tiny_model(dtype=dtype)
    ids = torch.randint(0, 256, (3, 21))
    logits = model(ids)
    assert logits.shape == (3, 21, 259) and logits.dtype == dtype
    targets = torch.randint(0, 256, (3, 21))
    targets[0, :5] = -100
    targets[1, 3:9] = model.config.pad_token_id  # PAD targets are ignored too
    logits2, loss = model(ids, targets)
    keep = (targets != -100) & (targets != model.config.pad_token_id)
    expected = F.cross_entropy(logits2.float()[keep], targets[keep])
    torch.testing.assert_close(loss, expected)
    assert loss.dtype == torch.float32
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randn(3, 21))
    with pytest.raises(ValueError, match="targets"):
        model(ids, targets[:, :4])


@pytest.mark.parametrize("norm_style", ["pre", "subln"])
def test_no_information_from_future_tokens(norm_style):
    model = tiny_model(norm_style=norm_style)
    ids = torch.randint(0, 256, (2, 50))
    base = model(ids)
    for t in (0, 17, 33, 49):
        ids2 = ids.clone()
        ids2[:, t] = (ids2[:, t] + 1) % 256
        out = model(ids2)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-12)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-6


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(norm_style="subln", tie_embeddings=False, num_kv_heads=1),
        # lcm(6, 4) = 12 and lcm(3, 4) = 12 against max(w) = 6 and 4: trimming in lcm
        # blocks would keep up to 11 old keys.
        dict(position_encoding="xpos", segment_lengths=[6, 4], dilation_rates=[3, 1]),
        dict(position_encoding="rotary", segment_lengths=[3, 4], dilation_rates=[1, 2]),
        dict(position_encoding=None, num_kv_heads=4),
    ],
)
def test_cached_logits_equal_full_forward_at_every_length(kw):
    """Every step's logits from KV-cached decoding equal a full forward over the same
    prefix, far past the largest segment and the lcm of the segment lengths, and no
    layer's cache ever holds more than max(w) - 1 keys besides the new ones."""
    model = tiny_model(**kw)
    ws = model.config.segment_lengths
    ids = torch.randint(0, 256, (2, 70))
    full = model(ids)
    cache = model.new_cache()
    prompt = 3
    step_logits = [model(ids[:, :prompt], cache=cache)]
    for t in range(prompt, ids.shape[1]):
        step_logits.append(model(ids[:, t : t + 1], cache=cache))
        # Causality makes full[:, t] the last logits of a forward over ids[:, :t+1]
        # (test_no_information_from_future_tokens); a few prefixes are run as well.
        torch.testing.assert_close(step_logits[-1][:, -1], full[:, t], rtol=1e-10, atol=1e-10)
        if t in (15, 16, 40, 69):
            prefix = model(ids[:, : t + 1])
            torch.testing.assert_close(
                step_logits[-1][:, -1], prefix[:, -1], rtol=1e-10, atol=1e-10
            )
        for layer_cache in cache:
            assert len(layer_cache) <= max(ws) - 1 + 1, (t, layer_cache)
            assert layer_cache.start == min((t // w) * w for w in ws)
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full, rtol=1e-10, atol=1e-10)


def test_cached_logits_with_position_offset():
    """A cache started at position_offset 7 (on no segment boundary) gives the logits
    of a full forward with that offset; an offset that contradicts the cache raises
    instead of being ignored."""
    model = tiny_model(segment_lengths=[3, 4], dilation_rates=[1, 2], position_encoding="xpos")
    ids = torch.randint(0, 256, (1, 30))
    full = model(ids, position_offset=7)
    assert (full - model(ids)).abs().max() > 1e-3
    cache = model.new_cache()
    steps = [model(ids[:, :2], cache=cache, position_offset=7)]
    steps += [model(ids[:, t : t + 1], cache=cache) for t in range(2, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="position_offset"):
        model(ids[:, :1], cache=cache, position_offset=0)


def test_generate_greedy_cache_matches_no_cache_and_top_k_1():
    model = tiny_model()
    prompt = torch.randint(0, 256, (2, 5))
    a = model.generate(prompt, 40, greedy=True, ignore_eos=True)
    b = model.generate(prompt, 40, greedy=True, use_cache=False, ignore_eos=True)
    c = model.generate(prompt, 40, top_k=1, temperature=0.7, ignore_eos=True)
    assert a.shape == (2, 45)
    assert torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b) and torch.equal(a, c)
    # The greedy tokens are the arg-max of a full forward over each prefix.
    logits = model(a[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), a[:, 5:])


def test_generate_sampling_is_reproducible_and_stops_at_eos():
    model = tiny_model(dtype=torch.float32)
    prompt = torch.randint(0, 256, (3, 4))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s1 = model.generate(prompt, 20, temperature=1.3, top_k=50, generator=g1)
    s2 = model.generate(prompt, 20, temperature=1.3, top_k=50, generator=g2)
    assert torch.equal(s1, s2)
    # Make EOS the arg-max everywhere: generation stops after one token.
    with torch.no_grad():
        model.decoder.final_norm.weight.zero_()
        model.decoder.final_norm.bias.fill_(1.0)
        model.embed_tokens.weight[258] = 10.0
    out = model.generate(prompt, 20, greedy=True, eos_token_id=258)
    assert out.shape == (3, 5) and (out[:, -1] == 258).all()
    # By default generation stops at the config's EOS (it used to run on to
    # max_new_tokens); ignore_eos turns that off.
    assert model.config.eos_token_id == 258
    assert torch.equal(model.generate(prompt, 20, greedy=True), out)
    assert model.generate(prompt, 20, greedy=True, ignore_eos=True).shape == (3, 24)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, top_k=0)


@pytest.mark.parametrize("use_safetensors", [True, False])
def test_save_and_load_round_trip(tmp_path, monkeypatch, use_safetensors):
    if use_safetensors:
        pytest.importorskip("safetensors")
    else:
        monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    model = tiny_model(
        dtype=torch.float32, norm_style="subln", tie_embeddings=False, position_encoding="xpos"
    )
    model.save_pretrained(tmp_path)
    names = set(os.listdir(tmp_path))
    assert "config.json" in names
    assert ("model.safetensors" if use_safetensors else "model.pt") in names
    loaded = LongNetLM.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    ids = torch.randint(0, 256, (2, 30))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        LongNetLM.from_pretrained(tmp_path / "missing")


def test_a_few_optimizer_steps_lower_the_loss():
    model = tiny_model(dtype=torch.float32).train()
    text = b"def add(a, b):\n    return a + b\n\n" * 4
    ids = torch.tensor([list(text)])
    x, y = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def _check_compiled(backend):
    model = tiny_model(dtype=torch.float32, num_layers=1)
    ids = torch.randint(0, 256, (2, 24))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)
    # Training through the compiled graph gives the eager gradients.
    y = torch.randint(0, 256, (2, 24))
    _, loss_c = compiled(ids, y)
    loss_c.backward()
    g_c = model.decoder.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    _, loss_e = model(ids, y)
    loss_e.backward()
    torch.testing.assert_close(
        g_c, model.decoder.layers[0].self_attn.q_proj.weight.grad, rtol=1e-4, atol=1e-6
    )


def test_torch_compile_fullgraph_traces_the_model():
    """Dynamo + AOT autograd over the whole model (no graph break), without codegen."""
    _check_compiled("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor():
    """The default inductor backend (about a minute of compiling on 2 CPU cores)."""
    _check_compiled("inductor")


def test_byte_tokenizer():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓\n"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert all(0 <= i < 256 for i in ids[1:-1]) and len(ids) == len(text.encode()) + 2
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode([0xFF]) == "\ufffd"
    assert len(tok) == 259 == LongNetConfig().vocab_size
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([300])
    with pytest.raises(TypeError):
        tok.encode(3)


def test_split_by_file_is_deterministic_and_disjoint(tmp_path):
    files = []
    for i in range(60):
        p = tmp_path / f"m{i}.py"
        p.write_text(f"x = {i}\n")
        files.append(str(p))
    train, val = split_by_file(files, str(tmp_path), 0.2)
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(files)
    assert 0 < len(val) < 30
    assert sorted(split_by_file(list(reversed(files)), str(tmp_path), 0.2)[1]) == sorted(val)
    stream = encode_files(files[:2])
    assert list(stream) == [257, *b"x = 0\n", 258, 257, *b"x = 1\n", 258]
    x, y = random_batch(np.arange(1000, dtype=np.uint16), 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == (4, 16) and torch.equal(y, x + 1) and x.dtype == torch.int64
    batches = eval_batches(np.arange(1000, dtype=np.uint16), 16, 5, 2)
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0][0][0, 0] == 0 and batches[-1][1][-1, -1] == 999


def _sequence_parallel_worker(rank, world, port):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        # (position encoding, position of the sequence's first token): offset 7 puts
        # every segment boundary off the ranks' chunk boundaries.
        for pe, offset in (("rotary", 0), ("xpos", 0), ("rotary", 7)):
            # Segments of 32 straddle the two ranks' chunks of 24 positions.
            model = tiny_model(
                segment_lengths=[4, 8, 32], dilation_rates=[1, 2, 4], position_encoding=pe
            )
            gen = torch.Generator().manual_seed(1)
            ids = torch.randint(0, 256, (2, 48), generator=gen)
            targets = torch.randint(0, 256, (2, 48), generator=gen)
            full_logits, full_loss = model(ids, targets, position_offset=offset)
            full_loss.backward()
            full_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad()

            model.set_sequence_parallel_group(dist.group.WORLD)
            n = 48 // world
            part = slice(rank * n, (rank + 1) * n)
            logits, loss = model(ids[:, part], targets[:, part], position_offset=offset)
            torch.testing.assert_close(logits, full_logits[:, part], rtol=1e-9, atol=1e-9)
            loss.backward()
            for name, p in model.named_parameters():
                dist.all_reduce(p.grad)
                torch.testing.assert_close(
                    p.grad / world,
                    full_grads[name],
                    rtol=1e-8,
                    atol=1e-10,
                    msg=f"{pe}, offset {offset}: {name}",
                )
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Both ranks passed: leave without the process group's shutdown handshake, whose
    # teardown can abort a peer that is still closing its connections.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_sequence_parallel_model_equals_single_process():
    """Two gloo ranks, each holding half of every sequence, give the logits of a
    single-process forward, and their averaged gradients are the full gradients."""
    import socket

    import torch.multiprocessing as mp

    import longnet.parallel  # noqa: F401  (an ImportError here is a failure, not a skip)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sequence_parallel_worker, args=(2, port), nprocs=2, join=True)


# ------------------------------------------------------------------ packed documents

# An empty document, documents shorter than the smallest segment and longer than
# the largest (max(w) = 16), starting off the segment grid (7, 44, 45), so that
# without boundaries they would attend into the document before them.
PACKED_LENGTHS = [7, 0, 37, 1, 25]


def _packed_docs(seed=0):
    from longnet.packing import cu_seqlens_from_lengths

    cu = cu_seqlens_from_lengths(PACKED_LENGTHS)
    docs = [(int(a), int(b)) for a, b in zip(cu[:-1], cu[1:])]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (1, sum(PACKED_LENGTHS)), generator=g)
    targets = torch.randint(0, 256, (1, sum(PACKED_LENGTHS)), generator=g)
    return cu, docs, ids, targets


def _lm_packed_and_alone(model, cu, docs, ids, targets):
    """Logits, loss and parameter gradients of the packed row, and the same from each
    document alone (its loss weighted by its share of the targets)."""
    model.zero_grad()
    logits, loss = model(ids, targets, cu_seqlens=cu)
    loss.backward()
    packed = (
        logits.detach(),
        loss.detach(),
        {n: p.grad.clone() for n, p in model.named_parameters()},
    )
    model.zero_grad()
    parts, total = [], torch.zeros((), dtype=torch.float64)
    for a, b in docs:
        if b > a:
            lg, ls = model(ids[:, a:b], targets[:, a:b])
            (ls * (b - a) / ids.shape[1]).backward()
            parts.append(lg.detach())
            total = total + ls.detach().double() * (b - a) / ids.shape[1]
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return packed, (torch.cat(parts, 1), total, grads)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(position_encoding="xpos", norm_style="subln", tie_embeddings=False),
        dict(checkpointing=True),
    ],
)
def test_packed_documents_equal_each_document_alone(kw):
    """Float64: the packed row's logits, mean loss and every parameter gradient equal
    those of the documents run alone, to 1e-12 (also through activation checkpointing,
    whose recomputed forward must get the boundaries too). Catches a layer that drops
    cu_seqlens (attention across documents: O(1) differences)."""
    kw = dict(kw)
    checkpointing = kw.pop("checkpointing", False)
    model = tiny_model(**kw)
    model.set_activation_checkpointing(checkpointing)
    cu, docs, ids, targets = _packed_docs()
    packed, alone = _lm_packed_and_alone(model, cu, docs, ids, targets)
    torch.testing.assert_close(packed[0], alone[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(packed[1].double(), alone[1], rtol=0, atol=1e-12)
    for name, grad in packed[2].items():
        torch.testing.assert_close(grad, alone[2][name], rtol=1e-12, atol=1e-12, msg=name)


def test_packed_documents_float32_within_the_alone_error():
    """Float32: the packed row's logits and gradients are as close to the float64
    documents-alone truth as the float32 documents-alone run is (at most twice its
    error, plus 8 float32 ulps of the quantity's scale: same operations, possibly
    summed in another order)."""
    cu, docs, ids, targets = _packed_docs()
    _, truth = _lm_packed_and_alone(tiny_model(), cu, docs, ids, targets)
    model32 = tiny_model(dtype=torch.float32)
    packed32, alone32 = _lm_packed_and_alone(model32, cu, docs, ids, targets)
    eps = torch.finfo(torch.float32).eps
    triples = [(packed32[0], alone32[0], truth[0]), (packed32[1], alone32[1], truth[1])]
    triples += [(packed32[2][n], alone32[2][n], truth[2][n]) for n in truth[2]]
    for got, ref32, ref in triples:
        bound = 2 * (ref32.double() - ref).abs().max().item() + 8 * eps * ref.abs().max().item()
        assert (got.double() - ref).abs().max().item() <= bound


def test_packed_document_never_sees_the_previous_one():
    """Changing every token of document i-1 leaves the logits and the loss of
    document i unchanged (to float64 rounding), while it does change them without
    the boundaries: no information crosses a document boundary."""
    model = tiny_model()
    cu, docs, ids, targets = _packed_docs()
    # docs[1] is empty: document 2's predecessor is document 0.
    for prev, (a, b) in ((docs[0], docs[2]), (docs[2], docs[3]), (docs[3], docs[4])):
        changed = ids.clone()
        changed[:, prev[0] : prev[1]] = (changed[:, prev[0] : prev[1]] + 1) % 256
        for boundaries, same in ((cu, True), (None, False)):
            base = model(ids, cu_seqlens=boundaries)
            other = model(changed, cu_seqlens=boundaries)
            diff = (other[:, a:b] - base[:, a:b]).abs().max().item()
            assert diff <= 1e-12 if same else diff > 1e-3, (prev, boundaries is None, diff)
        # The loss of document i alone (its targets only) does not move either.
        only = torch.full_like(targets, -100)
        only[:, a:b] = targets[:, a:b]
        with torch.no_grad():
            _, l0 = model(ids, only, cu_seqlens=cu)
            _, l1 = model(changed, only, cu_seqlens=cu)
        assert abs(float(l0) - float(l1)) <= 1e-12


def test_packed_documents_bad_use_raises():
    model = tiny_model()
    cu = torch.tensor([0, 4, 10])
    with pytest.raises(ValueError, match=r"input_ids of shape \(1, N\)"):
        model(torch.randint(0, 256, (2, 10)), cu_seqlens=cu)
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.randint(0, 256, (1, 10)), cu_seqlens=cu, cache=model.new_cache())
    with pytest.raises(ValueError, match=r"\[-1\] must equal the number of packed tokens \(10\)"):
        model(torch.randint(0, 256, (1, 10)), cu_seqlens=torch.tensor([0, 4, 9]))


def test_pack_documents_covers_every_token_once_with_boundaries_at_the_files(tmp_path):
    """Files of 0..70 bytes (one longer than two rows) packed into rows of 16: the rows
    read back in order are the stream, every token exactly once (then padding);
    every row's boundaries are exactly the file starts inside it, its own start and
    the padding's start; targets are each file's next byte and never cross a file.
    Catches boundaries off by one, a file piece continued without a boundary at a row
    start, and targets that predict the next file's BOS."""
    from longnet.data import encode_documents, pack_documents, packed_batch

    sizes = [3, 0, 70, 16, 14, 5]
    files = []
    for i, size in enumerate(sizes):
        p = tmp_path / f"f{i}.py"
        p.write_bytes(bytes((i * 31 + j) % 251 for j in range(size)))
        files.append(str(p))
    tokens, offsets = encode_documents(files)
    assert offsets.tolist() == [0, *np.cumsum([s + 2 for s in sizes]).tolist()]
    tok = ByteTokenizer()
    L = 16
    rows = pack_documents(tokens, offsets, L, tok.pad_token_id)
    n = tokens.size
    assert len(rows) == -(-n // L)
    flat = rows.inputs.reshape(-1)
    assert flat[:n].tolist() == tokens.tolist()
    assert (flat[n:] == tok.pad_token_id).all()
    doc_of = np.searchsorted(offsets, np.arange(n), side="right") - 1
    for r, cu in enumerate(rows.cu_seqlens):
        lo = r * L
        expected = {0, L} | {int(o) - lo for o in offsets if lo < o < lo + L}
        if lo < n < lo + L:
            expected.add(n - lo)
        assert cu.tolist() == sorted(expected), r
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):  # one file (or padding) each
            ids = {int(doc_of[lo + t]) if lo + t < n else -1 for t in range(a, b)}
            assert len(ids) == 1
    tgt = rows.targets.reshape(-1)
    for t in range(rows.inputs.numel()):
        same = t + 1 < n and doc_of[t] == doc_of[t + 1]
        assert int(tgt[t]) == (int(tokens[t + 1]) if same else -100), t
    x, y, cu = packed_batch(rows, [2, 0])
    assert x.shape == y.shape == (1, 2 * L)
    assert torch.equal(x[0, L:], rows.inputs[0]) and torch.equal(y[0, :L], rows.targets[2])
    assert cu.tolist() == rows.cu_seqlens[2].tolist() + [
        L + c for c in rows.cu_seqlens[0][1:].tolist()
    ]
    with pytest.raises(ValueError, match="offsets"):
        pack_documents(tokens, offsets[:-1], L, tok.pad_token_id)


@pytest.mark.parametrize("norm_style", ["pre", "subln"])
def test_chunked_feed_forward_and_loss_equal_the_whole_sequence(norm_style):
    """set_chunk_size + return_logits=False (the long-sequence training path: the
    feed-forward and the LM head + loss over sequence chunks, recomputed in backward)
    give the loss and every parameter gradient of the whole-sequence computation; in
    float64 only the order of the sums differs (1e-12). The chunk (7) divides neither
    N (30) nor the pattern, and ignored targets (-100, pad) fall in several chunks."""
    torch.manual_seed(0)
    ids = torch.randint(3, 259, (2, 30))
    targets = torch.randint(3, 259, (2, 30))
    targets[0, 3:12] = -100
    targets[1, 20] = 0  # the pad id: ignored as well
    grads, losses = [], []
    for chunk in (None, 7):
        model = tiny_model(norm_style=norm_style)
        model.set_chunk_size(chunk)
        if chunk is None:
            _, loss = model(ids, targets)
        else:
            logits, loss = model(ids, targets, return_logits=False)
            assert logits is None
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert abs(losses[0].item() - losses[1].item()) <= 1e-12
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="needs targets"):
        tiny_model()(ids, return_logits=False)
    with pytest.raises(ValueError, match="positive int"):
        tiny_model().set_chunk_size(0)


def test_sum_reduction_and_target_count():
    """forward(..., reduction="sum") is the mean loss times count_targets (the logits
    path and the chunked path, float64 to 1e-12), and a batch whose targets are all
    ignored gives a zero sum with zero (finite) gradients instead of the mean's 0 / 0
    = NaN. Catches a sum that counts padding or ignored targets."""
    model = tiny_model()
    model.set_chunk_size(7)
    torch.manual_seed(1)
    ids = torch.randint(3, 256, (2, 30))
    targets = torch.randint(3, 256, (2, 30))
    targets[0, 3:12] = -100
    targets[1, 20:25] = model.config.pad_token_id
    count = model.count_targets(targets)
    assert count.dtype == torch.int64 and int(count) == 60 - 9 - 5
    for logits in (True, False):
        _, mean = model(ids, targets, return_logits=logits)
        _, total = model(ids, targets, return_logits=logits, reduction="sum")
        assert abs(total.item() - mean.item() * int(count)) <= 1e-12 * total.item()
        ignored = torch.full_like(targets, -100)
        _, zero = model(ids, ignored, return_logits=logits, reduction="sum")
        zero.backward()
        assert zero.item() == 0.0 and int(model.count_targets(ignored)) == 0
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(bool((g == 0).all()) for g in grads)
        model.zero_grad()
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        model(ids, targets, reduction="none")


class _LargestOutputs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records, per size of the last dimension, the most elements of any one tensor
    an operator produced (a probe of what the computation holds at once), leaving out
    tensors of the shape of a parameter of ``model`` or of its transpose."""

    def __init__(self, model):
        super().__init__()
        self.largest: dict[int, int] = {}
        shapes = [tuple(p.shape) for p in model.parameters()]
        self.skip = set(shapes) | {s[::-1] for s in shapes}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and tuple(t.shape) not in self.skip:
                last = t.shape[-1]
                self.largest[last] = max(self.largest.get(last, 0), t.numel())
        return out


def test_chunked_feed_forward_and_lm_head_without_grad():
    """Without grad (evaluation) the chunked feed-forward and LM head + loss equal the
    unchunked ones (float64, 1e-12: only the order of the sums differs) and do chunk:
    no operator produces more than B x chunk x ffn_dim hidden values or B x chunk x
    vocab logits (unchunked: B x N x ...). The prefill of generate() with a cache
    chunks the feed-forward too and computes the LM head at the last position only.
    Catches an evaluation or a prefill that runs the feed-forward or the LM head over
    the whole sequence."""
    torch.manual_seed(0)
    b, n, chunk = 2, 30, 7
    ids = torch.randint(3, 256, (b, n))
    targets = torch.randint(3, 256, (b, n))
    targets[0, 3:12] = -100
    cfg = tiny_config()
    ffn, vocab = cfg.ffn_dim, cfg.vocab_size
    plain = tiny_model()
    with torch.no_grad():
        want_logits = plain(ids)
        _, want_loss = plain(ids, targets)
    model = tiny_model()
    model.set_chunk_size(chunk)
    with torch.no_grad(), _LargestOutputs(model) as probe:
        _, loss = model(ids, targets, return_logits=False)
    assert abs(loss.item() - want_loss.item()) <= 1e-12
    assert probe.largest[ffn] == b * chunk * ffn, probe.largest
    assert probe.largest[vocab] == b * chunk * vocab, probe.largest
    with torch.no_grad(), _LargestOutputs(model) as probe:
        logits = model(ids)  # the logits asked for are whole; the feed-forward chunks
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-12)
    assert probe.largest[ffn] == b * chunk * ffn, probe.largest
    with _LargestOutputs(model) as probe:
        out = model.generate(ids, 1, greedy=True)
    assert probe.largest[ffn] == b * chunk * ffn, probe.largest
    assert probe.largest[vocab] == b * vocab, probe.largest
    torch.testing.assert_close(out[:, -1], want_logits[:, -1].argmax(-1), rtol=0, atol=0)


@pytest.mark.parametrize("every,align", [(8, 4), (16, 16), (8, 8)])
def test_pack_documents_aligns_documents_that_cross_a_sequence_parallel_cut(every, align):
    """With boundary_every/align, every document that crosses a cut (a multiple of
    ``every`` inside a row) starts a multiple of ``align`` tokens before it, the
    documents keep their tokens in order, fillers carry no target, and every target
    is still its own document's next token. Then the sequence-parallel plan of each
    row exchanges nothing for patterns whose w divides align (it did without: the
    last assert). Catches a filler in the wrong place or with targets, and a
    document that still crosses off the grid."""
    from longnet.data import pack_documents
    from longnet.parallel.layout import spanning_documents
    from longnet.parallel.schedule import plan_rank

    rng = np.random.default_rng(every + align)
    lengths = rng.integers(0, 3 * every, size=40)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(1, 200, size=int(offsets[-1]))
    L = 2 * every if every < 16 else 32
    plain = pack_documents(tokens, offsets, L, 0)
    rows = pack_documents(tokens, offsets, L, 0, boundary_every=every, align=align)
    # The documents' tokens, in order, are the non-filler tokens.
    filler = (rows.targets == -100) & (rows.inputs == 0)
    assert rows.inputs[~filler].tolist()[: tokens.size] == tokens.tolist()
    # Every cut inside a row: the piece that crosses it starts on the grid.
    crossing_before = crossing_after = 0
    for packed, count in ((plain, "before"), (rows, "after")):
        for r in range(len(packed)):
            cu = packed.cu_seqlens[r].tolist()
            for g in range(every, L, every):
                docs = [(a, b) for a, b in zip(cu[:-1], cu[1:]) if a < g < b]
                if count == "after":
                    assert all((g - a) % align == 0 for a, _ in docs), (r, g, docs)
                    crossing_after += sum((g - a) % align != 0 for a, _ in docs)
                else:
                    crossing_before += sum((g - a) % align != 0 for a, _ in docs)
            # No plan exchanges anything for patterns dividing align.
            if count == "after":
                spans = spanning_documents(cu, L // every, every)
                plan = plan_rank(L // every, 1, every, 2, 2, (align,), (1,), True, 0, spans)
                assert sum(plan.recv_rows) == sum(plan.send_rows) == 0, (r, cu)
    assert crossing_before > 0 and crossing_after == 0
    # Targets: every document token keeps the target it has without fillers (its own
    # document's next token, or none), so no target points into a filler.
    n = tokens.size
    pairs_plain = list(
        zip(plain.inputs.reshape(-1)[:n].tolist(), plain.targets.reshape(-1)[:n].tolist())
    )
    keep = ~filler.reshape(-1)
    pairs = list(
        zip(rows.inputs.reshape(-1)[keep][:n].tolist(), rows.targets.reshape(-1)[keep][:n].tolist())
    )
    assert pairs == pairs_plain
    with pytest.raises(ValueError, match="boundary_every must be a positive divisor"):
        pack_documents(tokens, offsets, L, 0, boundary_every=L + 1)
    with pytest.raises(ValueError, match="align must be a positive divisor"):
        pack_documents(tokens, offsets, L, 0, boundary_every=every, align=every + 1)
