"""A first look at longnet's dilated attention: run it, check it, differentiate it.

python examples/quickstart.py
"""

import time

import torch

import longnet
from longnet.reference import dilated_attention_reference


def main() -> None:
    torch.manual_seed(0)
    # A batch of 2 sequences of 8192 tokens, 8 heads of 64 dims, with 2 key/value
    # heads (grouped-query attention).
    b, n, h, hk, d = 2, 8192, 8, 2, 64
    q = torch.randn(b, n, h, d, requires_grad=True)
    k = torch.randn(b, n, hk, d, requires_grad=True)
    v = torch.randn(b, n, hk, d, requires_grad=True)
    # Three patterns, w and r growing geometrically as in the paper.
    segment_lengths, dilation_rates = [2048, 4096, 8192], [1, 2, 4]

    start = time.perf_counter()
    out, lse = longnet.dilated_attention(
        q, k, v, segment_lengths, dilation_rates, is_causal=True, return_lse=True
    )
    out.square().mean().backward()
    elapsed = time.perf_counter() - start
    print(
        f"forward+backward on {b}x{n} tokens: {elapsed:.2f} s "
        f"(out {tuple(out.shape)}, lse {tuple(lse.shape)})"
    )

    # The same function, computed densely in float64 on a short sequence.
    n_small = 600
    qs, ks, vs = (t.detach()[:, :n_small].double() for t in (q, k, v))
    fast = longnet.dilated_attention(qs, ks, vs, [128, 256, 512], [1, 2, 4], is_causal=True)
    slow, _ = dilated_attention_reference(qs, ks, vs, [128, 256, 512], [1, 2, 4], is_causal=True)
    print(f"max |kernel - dense reference| in float64: {(fast - slow).abs().max().item():.2e}")

    # Cost grows linearly with the sequence length.
    for n_tokens in (4096, 16384, 65536):
        x = torch.randn(1, n_tokens, 4, 64)
        start = time.perf_counter()
        longnet.dilated_attention(x, x, x, segment_lengths, dilation_rates, is_causal=True)
        per_token = (time.perf_counter() - start) / n_tokens * 1e6
        print(f"N={n_tokens:>6}: {per_token:.2f} us per token (forward)")


if __name__ == "__main__":
    main()
