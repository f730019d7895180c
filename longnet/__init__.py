"""longnet: LongNet dilated attention (Ding et al., 2023) as a PyTorch extension.

>>> import torch, longnet
>>> q = k = v = torch.randn(1, 4096, 8, 64)
>>> out = longnet.dilated_attention(q, k, v, [1024, 2048, 4096], [1, 2, 4], is_causal=True)
"""

import torch

try:
    from longnet import _C  # noqa: F401  (registers torch.ops.longnet.*)
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "longnet's compiled operators (longnet._C) could not be loaded: "
        f"{exc}. Build them with `pip install --no-build-isolation -e .` from the "
        "repository root, against the torch that is installed now."
    ) from exc

from longnet.ops import dilated_attention, last_engine, use_engine  # noqa: E402

HAS_CUDA: bool = torch._C._dispatch_has_kernel_for_dispatch_key(
    "longnet::dilated_attention_fwd", "CUDA"
)
"""True when the extension was built with CUDA operators (the ATen engines; the fused
CUDA kernels also need ``LONGNET_FUSED_CUDA=1``)."""

__version__ = "0.1.0"

__all__ = ["dilated_attention", "use_engine", "last_engine", "HAS_CUDA", "__version__"]

from longnet.model import LongNetConfig, LongNetDecoder, LongNetDecoderLayer, LongNetLM  # noqa: E402
from longnet.modules import (  # noqa: E402
    DilatedAttention,
    KVCache,
    MultiheadDilatedAttention,
    RotaryEmbedding,
)
from longnet.tokenizer import ByteTokenizer  # noqa: E402

__all__ += [
    "DilatedAttention",
    "MultiheadDilatedAttention",
    "KVCache",
    "RotaryEmbedding",
    "LongNetConfig",
    "LongNetDecoderLayer",
    "LongNetDecoder",
    "LongNetLM",
    "ByteTokenizer",
]
