"""The long-range retrieval benchmark: task generator, evaluation, patterns, smoke run."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import long_range as lr  # noqa: E402


def _spec(fact="joint", **kw):
    base = dict(
        seq_len=512, stride=8, pairs=6, keys=10, values=5, fillers=3, bucket_unit=32, fact=fact
    )
    base.update(kw)
    return lr.TaskSpec(**base)


def test_vocabulary_ranges_are_disjoint():
    for fact in ("joint", "pair"):
        spec = _spec(fact)
        fillers = set(range(spec.fillers))
        queries = {spec.query_token(k) for k in range(spec.keys)}
        answers = {spec.answer_token(k, v) for k in range(spec.keys) for v in range(spec.values)}
        groups = [fillers, queries, answers]
        assert sum(map(len, groups)) == len(set().union(*groups)) == spec.vocab_size
        assert max(set().union(*groups)) == spec.vocab_size - 1
        if fact == "joint":  # one answer token per (key, value): F(k, v)
            assert len(answers) == spec.keys * spec.values
            assert spec.answer_token(2, 3) == spec.fact_token(2, 3)
            with pytest.raises(ValueError):
                spec.value_token(0)
        else:  # the answer is the value token A(v), shared by the keys
            assert len(answers) == spec.values
            assert spec.answer_token(2, 3) == spec.answer_token(5, 3) == spec.value_token(3)
            with pytest.raises(ValueError):
                spec.fact_token(0, 0)


@pytest.mark.parametrize("fact", ["joint", "pair"])
def test_generator_puts_answers_where_it_says(fact):
    spec = _spec(fact)
    batch = lr.make_batch(spec, 6, torch.Generator().manual_seed(3))
    assert batch.ids.shape == batch.targets.shape == (6, spec.seq_len)
    assert int(batch.ids.max()) < spec.vocab_size and int(batch.ids.min()) >= 0
    for b in range(6):
        ids, tgt = batch.ids[b], batch.targets[b]
        qs = (tgt != lr.IGNORE).nonzero().flatten().tolist()
        assert len(qs) == spec.pairs
        special = set()
        keys_seen = []
        for q in qs:
            key = int(ids[q]) - spec.query_base
            assert 0 <= key < spec.keys
            keys_seen.append(key)
            if fact == "joint":
                value = (int(tgt[q]) - spec.fact_base) - key * spec.values
            else:
                value = int(tgt[q]) - spec.value_base
            assert 0 <= value < spec.values
            assert int(tgt[q]) == spec.answer_token(key, value)
            assert int(ids[q + 1]) == int(tgt[q])  # the answer follows the query
            f = int(batch.fact_pos[b, q])
            assert int(batch.distance[b, q]) == q - f > 0
            assert q % spec.stride == 0 and f % spec.stride == 0
            assert int(ids[f]) == int(tgt[q])  # the fact holds the answer
            if fact == "joint":
                special.update((f, q, q + 1))
            else:
                assert int(ids[f - 1]) == spec.query_token(key)
                assert f % spec.bucket_unit != 0  # K(k) in A(v)'s smallest segment
                special.update((f - 1, f, q, q + 1))
        assert len(set(keys_seen)) == spec.pairs  # every key once
        # The key appears nowhere else before its query (the fact is unambiguous).
        for q in qs:
            key_tok = int(ids[q])
            assert (ids[:q] == key_tok).sum() == (0 if fact == "joint" else 1)
        # Everything else is filler.
        rest = [p for p in range(spec.seq_len) if p not in special]
        assert bool((ids[rest] < spec.fillers).all())
        assert (batch.distance[b] >= 0).sum() == spec.pairs


def test_distances_cover_every_bucket_evenly():
    spec = _spec(seq_len=1024, stride=16, pairs=8, bucket_unit=64)
    edges = spec.bucket_edges()
    assert edges == [0, 64, 128, 256, 512, 1024]
    batch = lr.make_batch(spec, 80, torch.Generator().manual_seed(0))
    d = batch.distance[batch.distance >= 0]
    assert d.numel() == 80 * spec.pairs
    assert bool((d % spec.stride == 0).all()) and int(d.min()) >= spec.stride
    assert int(d.max()) < spec.seq_len
    counts = [int(((d >= lo) & (d < hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])]
    expected = d.numel() / len(counts)
    for c in counts:
        assert 0.6 * expected < c < 1.4 * expected, counts


def test_generator_is_reproducible_and_validates():
    spec = _spec()
    a = lr.make_batch(spec, 2, torch.Generator().manual_seed(5))
    b = lr.make_batch(spec, 2, torch.Generator().manual_seed(5))
    c = lr.make_batch(spec, 2, torch.Generator().manual_seed(6))
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    with pytest.raises(ValueError):
        lr.TaskSpec(seq_len=64, stride=8, pairs=6, keys=10)  # 12 slots needed, 7 exist
    with pytest.raises(ValueError):
        lr.TaskSpec(seq_len=512, stride=8, pairs=12, keys=10)  # more pairs than keys
    with pytest.raises(ValueError):
        _spec(fact="triple")


def test_exact_match_and_buckets_on_hand_made_logits():
    logits = torch.tensor(
        [
            [0.1, 2.0, 0.3],  # argmax 1
            [5.0, 1.0, 1.0],  # argmax 0
            [0.0, 0.0, 3.0],  # argmax 2
            [1.0, 0.9, 0.0],
        ]
    )  # argmax 0
    targets = torch.tensor([1, 2, 2, 0])
    correct = lr.exact_match(logits, targets)
    assert correct.tolist() == [True, False, True, True]
    dist = torch.tensor([10, 32, 40, 300])  # 32 opens the second bucket [32, 64)
    buckets = lr.accuracy_by_bucket(correct, dist, [0, 32, 64, 256, 512])
    assert [c for c, _ in buckets] == [1, 2, 0, 1]
    assert buckets[0][1] == 1.0 and buckets[1][1] == 0.5 and buckets[3][1] == 1.0
    assert math.isnan(buckets[2][1])
    with pytest.raises(ValueError):
        lr.exact_match(logits, targets[:3])


def test_evaluate_scores_a_model_that_knows_the_answers():
    """``evaluate`` on a stand-in model whose logits put the answer first (or not)."""
    spec = _spec(seq_len=256, pairs=4, bucket_unit=32)
    batches = [lr.make_batch(spec, 3, torch.Generator().manual_seed(1))]
    edges = spec.bucket_edges()

    class Oracle(torch.nn.Module):
        """Embeds token ``t`` as one-hot ``t + shift`` and decodes with the identity."""

        def __init__(self, shift):
            super().__init__()
            self.shift = shift
            self.lm_head = None
            self.embed_tokens = torch.nn.Embedding(spec.vocab_size, spec.vocab_size)
            with torch.no_grad():
                self.embed_tokens.weight.copy_(torch.eye(spec.vocab_size))

        def decoder(self, x):  # next token = answer: look one position ahead
            return torch.roll(x, -1, dims=1).roll(self.shift, dims=2)

    right = lr.evaluate(Oracle(0), batches, edges, "cpu")
    wrong = lr.evaluate(Oracle(1), batches, edges, "cpu")
    assert right["accuracy"] == 1.0 and wrong["accuracy"] == 0.0
    assert sum(c for c, _ in right["buckets"]) == 3 * spec.pairs


def test_patterns_and_cost_matched_window():
    ws, rs = lr.dilated_patterns(8192, 256)
    assert ws == [256, 512, 1024, 2048, 4096, 8192] and rs == [1, 2, 4, 8, 16, 32]
    w = lr.local_window(8192, ws, rs)
    assert w == 504
    dil = lr.attention_cost(8192, ws, rs)
    loc = lr.attention_cost(8192, [w], [1])
    assert abs(loc - dil) / dil < 0.01
    assert lr.variant_patterns("local", 8192, 256) == ([504], [1])
    assert lr.variant_patterns("dense", 2048, 256) == ([2048], [1])
    assert lr.variant_patterns("dilated", 2048, 256) == ([256, 512, 1024, 2048], [1, 2, 4, 8])
    with pytest.raises(ValueError):
        lr.variant_patterns("sparse", 2048, 256)


def test_smoke_run_writes_table_json_and_plot(tmp_path):
    """A smoke test: the benchmark runs end to end (3 steps teach nothing, so no
    accuracy is judged) and its outputs agree with each other: each overall accuracy
    is the count-weighted mean of its buckets' over the 3 x 3 evaluated queries, each
    step's training accuracy a multiple of 1 / (2 x 3) queries."""
    out = tmp_path / "res"
    env = dict(
        os.environ,
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "long_range.py"),
            "--seq-lens",
            "128,256",
            "--w0",
            "32",
            "--dense-max-len",
            "128",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--pairs",
            "3",
            "--keys",
            "6",
            "--values",
            "4",
            "--fillers",
            "2",
            "--layers",
            "1",
            "--embed-dim",
            "16",
            "--heads",
            "2",
            "--eval-sequences",
            "3",
            "--threads",
            "1",
            "--quiet",
            "--out-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dense N=256: skipped" in proc.stdout
    assert "| dilated | 32,64,128 / 1,2,4 |" in proc.stdout
    with open(out / "long_range.json") as f:
        summary = json.load(f)
    got = [(r["seq_len"], r["variant"]) for r in summary["results"]]
    assert got == [
        (128, "dilated"),
        (128, "local"),
        (128, "dense"),
        (256, "dilated"),
        (256, "local"),
    ]
    for r in summary["results"]:
        assert [step for step, _, _ in r["history"]] == [1, 2, 3]
        for _, loss, acc in r["history"]:
            assert loss > 0 and abs(acc * 6 - round(acc * 6)) < 1e-3, r["history"]
        spec = lr.TaskSpec(**summary["lengths"][str(r["seq_len"])]["task"])
        assert spec.stride == r["dilation_rates"][-1] or r["variant"] != "dilated"
        assert len(r["buckets"]) == len(spec.bucket_edges()) - 1
        assert sum(c for c, _ in r["buckets"]) == 3 * 3
        correct = sum(c * a for c, a in r["buckets"] if c > 0)
        assert abs(correct - round(correct)) < 1e-9, r["buckets"]
        assert r["accuracy"] == pytest.approx(round(correct) / 9, abs=1e-12), r
    assert summary["chance"] == 0.25
    [skip] = summary["skipped"]
    assert skip["variant"] == "dense" and skip["seq_len"] == 256 and skip["s_per_step"] > 0
    assert "dense: not trained at N = 256 (measured" in proc.stdout
    with open(out / "long_range.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
