"""RoPE scaling through the transformers integration, and the resumable long-context
fine-tune (examples/finetune_long_context.py).

RoPE is applied by the model before the attention function, so dilated attention must
see the rescaled rotations: with one pattern covering the sequence (dense attention)
its logits equal sdpa's under the same scaling, to float64 rounding, and differ from
the unscaled model's by a million times that bound (so the scaling cannot be ignored).
"""

import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

import longnet.integrations.transformers as lt  # noqa: E402
from longnet.integrations.rope import parse_rope_scaling, set_rope_scaling  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 96  # tokens; max_position_embeddings is 32, so positions run 3x past it


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rope_theta=100.0,
    )
    return transformers.LlamaForCausalLM(config).double().eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("rope", ["linear:3", "yarn:3", "dynamic:3"])
def test_dilated_attention_sees_the_scaled_rope(rope):
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, N), generator=torch.Generator().manual_seed(1))
    plain = logits(model, ids)
    set_rope_scaling(model, parse_rope_scaling(rope))
    sdpa = logits(model, ids)
    lt.enable(model, [N], [1])  # one segment holding every token: dense attention
    dilated = logits(model, ids)
    # float64 throughout: two orders of summation differ by a few ulps of O(1) values
    assert torch.allclose(dilated, sdpa, rtol=0, atol=1e-10)
    # the scaling moves the (near-uniform, random-init) logits by ~1e-3: a million
    # times the bound above, so ignoring it cannot pass
    assert (sdpa - plain).abs().max() > 1e-4


def test_rope_scaling_restores_and_does_not_compound():
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, N), generator=torch.Generator().manual_seed(2))
    plain = logits(model, ids)
    set_rope_scaling(model, {"rope_type": "linear", "factor": 2.0})
    once = logits(model, ids)
    set_rope_scaling(model, {"rope_type": "linear", "factor": 2.0})
    assert torch.equal(logits(model, ids), once)
    set_rope_scaling(model, None)
    assert torch.equal(logits(model, ids), plain)


@pytest.mark.parametrize("text", ["linear", "yarn:x", "cubic:2", "linear:0.5", "linear:nan"])
def test_parse_rope_scaling_errors(text):
    with pytest.raises(ValueError, match="TYPE:FACTOR"):
        parse_rope_scaling(text)


def test_parse_rope_scaling():
    assert parse_rope_scaling("none") is None
    assert parse_rope_scaling("yarn:4") == {"rope_type": "yarn", "factor": 4.0}


def test_set_rope_scaling_errors():
    with pytest.raises(ValueError, match="model"):
        set_rope_scaling(torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="rope"):
        set_rope_scaling(tiny_llama(), {"factor": 2.0})


@pytest.fixture(scope="module")
def finetune():
    try:
        import peft  # noqa: F401

        from longnet.integrations.smollm2 import smollm2_gguf_path

        smollm2_gguf_path()
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the pretrained-model tests: {exc}")
        pytest.skip(f"SmolLM2 is not installed: {exc}")
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import finetune_long_context

    return finetune_long_context


def _args(out_dir, *extra):
    return [
        "--out-dir", str(out_dir),
        "--seq-len", "64",
        "--segment-lengths", "16,64",
        "--dilation-rates", "1,4",
        "--steps", "2",
        "--max-train-bytes", "20000",
        "--threads", "1",
        "--quiet",
        *extra,
    ]  # fmt: skip


def test_finetune_resume_is_exact(finetune, tmp_path):
    """Two steps in one go equal one step, a stop, and a resume: the same adapter
    weights bit for bit (optimizer, data generator and step come back from state.pt);
    a resume with another --steps is refused."""
    from safetensors.torch import load_file

    whole = finetune.main(_args(tmp_path / "whole"))
    part = finetune.main(_args(tmp_path / "part", "--stop-after", "1"))
    assert part["step"] == 1
    resumed = finetune.main(_args(tmp_path / "part"))
    assert resumed["loss"] == whole["loss"] and len(whole["loss"]) == 2
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "part" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)  # it trained
    with pytest.raises(SystemExit, match="steps"):
        finetune.main(_args(tmp_path / "part", "--steps", "3"))
