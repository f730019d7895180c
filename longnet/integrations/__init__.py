"""Bridges from ``longnet`` to other libraries.

Each submodule imports its library itself, so ``import longnet`` never needs them:

* ``longnet.integrations.transformers``: dilated attention inside Hugging Face
  ``transformers`` models (``attn_implementation="longnet"``).
* ``longnet.integrations.smollm2``: SmolLM2-135M-Instruct loaded offline
  (``load_smollm2``), a pretrained model to run that attention in.
"""
