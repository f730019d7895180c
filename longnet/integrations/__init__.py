"""Bridges from ``longnet`` to other libraries.

Each submodule imports its library itself, so ``import longnet`` never needs them:

* ``longnet.integrations.transformers``: dilated attention inside Hugging Face
  ``transformers`` models (``attn_implementation="longnet"``).
  Beside it: ``patterns`` (patterns in a transformers config), ``cache``
  (``DilatedAttentionCache``, the generation cache that keeps only reachable keys) and
  ``pattern_cache`` (its per-pattern storage for patterns that cover the context).
* ``longnet.integrations.rope``: RoPE scaling of a loaded model (``set_rope_scaling``).
* ``longnet.integrations.smollm2``: SmolLM2-135M-Instruct loaded offline
  (``load_smollm2``), a pretrained model to run that attention in.
"""
