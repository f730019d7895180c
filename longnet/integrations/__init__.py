"""Bridges from ``longnet`` to other libraries.

Each submodule imports its library itself, so ``import longnet`` never needs them:

* ``longnet.integrations.transformers``: dilated attention inside Hugging Face
  ``transformers`` models (``attn_implementation="longnet"``).
"""
