"""GPU benchmark of longnet.dilated_attention (bfloat16, D = 128).

Compares forward and forward+backward time, TFLOP/s and peak memory of

* ``longnet[<engine>]``: the operator on each engine (``cuda_flash``, ``cuda_cudnn``,
  ``cuda_efficient``: dense problems over strided views on ATen's kernels;
  ``fused``: the package's own CUDA kernels), checked with ``longnet.last_engine()``;
* ``sdpa-<backend>``: PyTorch SDPA on a dense problem with the same number of needed
  FLOPs (segments of length L = sum_i w_i / r_i**2) on the flash, cuDNN and
  efficient backends: the ceiling of the engine on the same kernel (the ``vs dense``
  column is engine TFLOP/s over that backend's dense TFLOP/s);
* ``gather-sdpa``: gather the sparse segments, flash attention per pattern and head
  offset, scatter back and merge by log-sum-exp (the official implementation's way;
  its mixing weights are detached, as there);
* ``flex``: FlexAttention with a block mask of the same pattern and the multiset
  counts as a log-count score modification (exact semantics, block-sparse only;
  causal problem only, to keep compile time down);

then packed documents (log-normal lengths, mean N / 32) as one packed call against
one call per document on each engine (cuda_flash and cuda_efficient run the packed
call as varlen kernel calls), then the longest sequence whose forward, and whose
forward+backward, fits (target 64M tokens forward, H * D = 128) on the automatic
engine choice.

TFLOP/s count only needed FLOPs: 4 * N * H * D * w_i / r_i**2 per pattern forward,
half of it causal, 2.5x for the backward (so forward+backward is 3.5x).

Usage: python3 benchmarks/bench_gpu.py [--quick] [--skip-flex] [--skip-packed] [--max-tokens N]
       [--engines cuda_flash,cuda_cudnn,cuda_efficient,fused]
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Sequence
from typing import Callable

import torch
import torch.nn.functional as F

import longnet


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def needed_flops(
    n: int, heads: int, dim: int, ws: Sequence[int], rs: Sequence[int], causal: bool, batch: int = 1
) -> float:
    """Forward FLOPs of dilated attention that the patterns need (docs/operator.md)."""
    total = sum(4.0 * batch * n * heads * dim * min(w, n) / r**2 for w, r in zip(ws, rs))
    return total / 2 if causal else total


def time_cuda(fn: Callable[[], object], warmup: int = 1, reps: int = 3) -> tuple[float, float]:
    """(median ms, peak GiB allocated during one timed call) of fn on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    times.sort()
    return times[len(times) // 2], peak


# ------------------------------------------------------------- baselines ----


def _flash_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of flash attention on (B, H, L, D) tensors; lse is not differentiable."""
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, causal, False, scale=scale
    )
    return res[0], res[1]


def gather_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ws: Sequence[int],
    rs: Sequence[int],
    causal: bool,
) -> torch.Tensor:
    """Gather + flash attention + lse merge; needs N divisible by every w and H == Hk.

    Head j uses offset j mod r, so the heads of offset o are heads o::r and their
    sparse segments are rows o::r of every segment: one strided slice per (pattern,
    offset), copied out for the flash kernel and scattered back.
    """
    b, n, h, d = q.shape
    scale = 1.0 / math.sqrt(d)
    outs, lses = [], []
    for w, r in zip(ws, rs):
        w = min(w, n)
        nseg = n // w
        out_i = q.new_zeros(b, nseg, w, h, d)
        lse_i = torch.full((b, nseg, w, h), -math.inf, device=q.device, dtype=torch.float32)
        views = [t.view(b, nseg, w, h, d) for t in (q, k, v)]
        for o in range(min(r, h)):
            qs, ks, vs = (x[:, :, o::r, o::r] for x in views)  # (b, nseg, w/r, h/r, d)
            rows, ho = qs.shape[2], qs.shape[3]
            qc, kc, vc = (
                x.reshape(b * nseg, rows, ho, d).transpose(1, 2).contiguous() for x in (qs, ks, vs)
            )
            oc, lc = _flash_with_lse(qc, kc, vc, causal, scale)
            out_i[:, :, o::r, o::r] = oc.transpose(1, 2).reshape(b, nseg, rows, ho, d)
            lse_i[:, :, o::r, o::r] = lc.transpose(1, 2).reshape(b, nseg, rows, ho)
        outs.append(out_i.view(b, n, h, d))
        lses.append(lse_i.view(b, n, h))
    lse_all = torch.stack(lses)  # (m, b, n, h)
    top = lse_all.amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lse_all - top)
    weights = weights / weights.sum(0).clamp_min(1e-30)
    out = sum(wi.unsqueeze(-1) * oi.float() for wi, oi in zip(weights, outs))
    return out.to(q.dtype)


def make_flex(n: int, heads: int, ws: Sequence[int], rs: Sequence[int], causal: bool):
    """A compiled FlexAttention call with the patterns' block mask and log-count scores."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def count(h, q_idx, kv_idx):
        c = torch.zeros_like(q_idx)
        for w, r in zip(ws, rs):
            o = h % r
            hit = ((q_idx // w) == (kv_idx // w)) & ((q_idx % w) % r == o) & ((kv_idx % w) % r == o)
            c = c + hit.to(c.dtype)
        if causal:
            c = torch.where(kv_idx <= q_idx, c, torch.zeros_like(c))
        return c

    def mask_mod(b, h, q_idx, kv_idx):
        return count(h, q_idx, kv_idx) > 0

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + torch.log(count(h, q_idx, kv_idx).to(score.dtype))

    try:  # the compiled builder never materialises the (H, N, N) mask
        block_mask = torch.compile(create_block_mask)(mask_mod, None, heads, n, n, "cuda")
    except Exception:
        block_mask = create_block_mask(mask_mod, B=None, H=heads, Q_LEN=n, KV_LEN=n, device="cuda")
    compiled = torch.compile(flex_attention)

    def run(q, k, v):  # (B, N, H, D) in and out
        out = compiled(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            score_mod=score_mod,
            block_mask=block_mask,
        )
        return out.transpose(1, 2)

    return run


# ------------------------------------------------------------ benchmark ----


def bench_method(
    name: str, fwd: Callable, inputs: list[torch.Tensor], flops: float, rows: list[dict], reps: int
) -> torch.Tensor | None:
    """Times forward and forward+backward of fwd(*inputs); appends table rows."""
    try:
        with torch.no_grad():
            ms_f, mem_f = time_cuda(lambda: fwd(*inputs), reps=reps)
        grad = torch.randn_like(inputs[0])

        def step():
            out = fwd(*inputs)
            torch.autograd.grad(out, inputs, grad)

        ms_fb, mem_fb = time_cuda(step, reps=reps)
        rows.append(
            dict(
                method=name,
                fwd_ms=ms_f,
                fwd_tflops=flops / ms_f / 1e9,
                bwd_ms=ms_fb - ms_f,
                bwd_tflops=2.5 * flops / max(ms_fb - ms_f, 1e-6) / 1e9,
                fwd_gib=mem_f,
                fb_gib=mem_fb,
            )
        )
        log(f"  {name}: fwd {ms_f:.2f} ms, fwd+bwd {ms_fb:.2f} ms")
        with torch.no_grad():
            return fwd(*inputs)
    except Exception as exc:  # a baseline that cannot run here is reported, not fatal
        log(f"  {name}: unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:150]})")
        rows.append(dict(method=name, error=type(exc).__name__))
        return None
    finally:
        torch.cuda.empty_cache()


# The SDPA backend whose dense kernel each engine runs on.
ENGINE_BACKEND = {
    "cuda_flash": "sdpa-flash",
    "cuda_cudnn": "sdpa-cudnn",
    "cuda_efficient": "sdpa-efficient",
}


def print_table(title: str, rows: list[dict]) -> None:
    by_name = {row["method"]: row for row in rows}
    print(f"\n{title}")
    print(
        f"{'method':<24}{'fwd ms':>10}{'fwd TF/s':>10}{'bwd ms':>10}{'bwd TF/s':>10}"
        f"{'fwd GiB':>10}{'f+b GiB':>10}{'vs dense':>16}"
    )
    for row in rows:
        if "error" in row:
            print(f"{row['method']:<24}{'n/a (' + row['error'] + ')':>86}")
            continue
        ratio = ""
        engine = row["method"][len("longnet[") : -1] if row["method"].startswith("longnet[") else ""
        dense = by_name.get(ENGINE_BACKEND.get(engine, ""))
        if dense is not None and "error" not in dense:
            ratio = (
                f"{row['fwd_tflops'] / dense['fwd_tflops']:.2f}/"
                f"{row['bwd_tflops'] / dense['bwd_tflops']:.2f}"
            )
        print(
            f"{row['method']:<24}{row['fwd_ms']:>10.2f}{row['fwd_tflops']:>10.1f}"
            f"{row['bwd_ms']:>10.2f}{row['bwd_tflops']:>10.1f}{row['fwd_gib']:>10.2f}"
            f"{row['fb_gib']:>10.2f}{ratio:>16}"
        )
    print("(vs dense: forward/backward TFLOP/s over the dense SDPA of the same kernel)")
    sys.stdout.flush()


def on_engine(engine: str, ws: Sequence[int], rs: Sequence[int], causal: bool) -> Callable:
    """longnet.dilated_attention forced onto `engine`; raises if another engine ran."""

    def run(a, b, c):
        with longnet.use_engine(engine):
            out = longnet.dilated_attention(a, b, c, ws, rs, is_causal=causal)
        if longnet.last_engine() != engine:
            raise RuntimeError(f"ran on {longnet.last_engine()}, not {engine}")
        return out

    return run


def compare_problem(
    n: int,
    heads: int,
    dim: int,
    ws: list[int],
    rs: list[int],
    causal: bool,
    skip_flex: bool,
    reps: int,
    engines: Sequence[str],
) -> None:
    dtype = torch.bfloat16
    flops = needed_flops(n, heads, dim, ws, rs, causal)
    log(
        f"problem N={n} H={heads} D={dim} w={ws} r={rs} causal={causal}: "
        f"{flops / 1e12:.2f} TFLOP forward"
    )
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, n, heads, dim, device="cuda", dtype=dtype, generator=gen).requires_grad_()
        for _ in range(3)
    )
    rows: list[dict] = []
    ours = None
    for engine in engines:
        out = bench_method(
            f"longnet[{engine}]", on_engine(engine, ws, rs, causal), [q, k, v], flops, rows, reps
        )
        ours = out if ours is None else ours

    # Dense SDPA with the same needed FLOPs: segments of L = sum w / r^2 rows.
    seg = max(64, int(round(sum(min(w, n) / r**2 for w, r in zip(ws, rs)) / 64)) * 64)
    nb = max(1, n // seg)
    dense = [
        torch.randn(nb, heads, seg, dim, device="cuda", dtype=dtype, generator=gen).requires_grad_()
        for _ in range(3)
    ]
    dense_flops = 4.0 * nb * seg * seg * heads * dim / (2 if causal else 1)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    for label, backend in (
        ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
        ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):

        def sdpa(a, b, c, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(a, b, c, is_causal=causal)

        bench_method(label, sdpa, dense, dense_flops, rows, reps)
    del dense
    base = bench_method(
        "gather-sdpa",
        lambda a, b, c: gather_sdpa(a, b, c, ws, rs, causal),
        [q, k, v],
        flops,
        rows,
        reps,
    )
    if ours is not None and base is not None:
        err = ((ours.float() - base.float()).norm() / base.float().norm()).item()
        log(f"  longnet[{engines[0]}] vs gather-sdpa forward: relative difference {err:.2e}")
    if not skip_flex and causal:  # one compile only: the causal (language-model) case
        try:
            log("  flex: building block mask and compiling")
            flex = make_flex(n, heads, ws, rs, causal)
            bench_method("flex", flex, [q, k, v], flops, rows, reps)
        except Exception as exc:
            log(f"  flex: unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:150]})")
            rows.append(dict(method="flex", error=type(exc).__name__))
    print_table(
        f"bf16, N={n}, H={heads}, D={dim}, w={ws}, r={rs}, causal={causal} "
        f"(needed {flops / 1e12:.2f} TFLOP forward)",
        rows,
    )
    del q, k, v
    torch.cuda.empty_cache()


def _attention_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ws: list[int], rs: list[int], backward: bool
) -> None:
    """One causal dilated attention call (and its backward when ``backward``)."""
    with torch.set_grad_enabled(backward):
        out = longnet.dilated_attention(q, k, v, ws, rs, is_causal=True)
        if backward:
            torch.autograd.grad(out, (q, k, v), out)


def largest(max_tokens: int, ws: list[int], rs: list[int], backward: bool) -> None:
    """Longest N (halving from max_tokens) whose forward (or forward+backward) fits,
    H = 1, D = 128, bf16, causal, on the automatic engine choice."""
    heads, dim = 1, 128
    what = "forward+backward" if backward else "forward"
    n = max_tokens
    while n >= max(ws):
        q = k = v = None
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            log(f"largest {what}: trying N = {n:,} tokens (H*D = {heads * dim})")
            q, k, v = (
                torch.empty(1, n, heads, dim, device="cuda", dtype=torch.bfloat16)
                .normal_()
                .requires_grad_(backward)
                for _ in range(3)
            )

            # The partial lives only as long as time_cuda's call (an out-of-memory
            # error included), so the finally clause below frees q, k and v.
            ms, peak = time_cuda(
                functools.partial(_attention_step, q, k, v, ws, rs, backward), warmup=1, reps=1
            )
            flops = needed_flops(n, heads, dim, ws, rs, True) * (3.5 if backward else 1.0)
            total = torch.cuda.max_memory_allocated() / 2**30
            print(
                f"\nlargest {what}: N = {n:,} tokens (H=1, D=128, causal, w={ws}, r={rs}, "
                f"engine {longnet.last_engine()}): {ms:.1f} ms, {flops / ms / 1e9:.1f} TFLOP/s, "
                f"peak {total:.1f} GiB ({peak:.1f} GiB beyond q, k, v)",
                flush=True,
            )
            return
        except torch.OutOfMemoryError:
            log(f"  N = {n:,} does not fit")
            n //= 2
        finally:
            q = k = v = None
            torch.cuda.empty_cache()
    print(f"largest {what}: nothing fitted", flush=True)


def document_lengths(n: int, mean: int, seed: int = 0) -> list[int]:
    """Log-normal document lengths (sigma 1, the given mean) that sum to n."""
    gen = torch.Generator().manual_seed(seed)
    mu = math.log(mean) - 0.5
    lengths: list[int] = []
    while sum(lengths) < n:
        draw = float(torch.empty(1).log_normal_(mu, 1.0, generator=gen))
        lengths.append(max(1, min(int(draw), n - sum(lengths))))
    return lengths


def packed_documents(
    n: int,
    heads: int,
    dim: int,
    ws: Sequence[int],
    rs: Sequence[int],
    engines: Sequence[str],
    reps: int,
    mean: int,
) -> None:
    """Packed documents (causal): one packed call (cu_seqlens; varlen kernel calls on
    cuda_flash and cuda_efficient, one problem set per document elsewhere) against
    the same documents one call each."""
    lengths = document_lengths(n, mean)
    log(f"packed documents: {len(lengths)} documents in {n:,} tokens (mean {mean:,})")
    cu = longnet.packing.cu_seqlens_from_lengths(lengths)  # on the host: no sync per call
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    inputs = [
        torch.randn(1, n, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    ]
    flops = sum(needed_flops(b - a, heads, dim, ws, rs, True) for a, b in bounds)
    rows: list[dict] = []
    for engine in engines:

        def packed(a, b, c, engine=engine):
            with longnet.use_engine(engine):
                return longnet.dilated_attention(
                    a, b, c, ws, rs, is_causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu
                )

        def one_call_each(a, b, c, engine=engine):
            with longnet.use_engine(engine):
                parts = [
                    longnet.dilated_attention(
                        a[:, s:e], b[:, s:e], c[:, s:e], ws, rs, is_causal=True
                    )
                    for s, e in bounds
                ]
            return torch.cat(parts, dim=1)

        bench_method(f"{engine} packed", packed, inputs, flops, rows, reps)
        bench_method(f"{engine} per document", one_call_each, inputs, flops, rows, reps)
    print_table(
        f"packed documents, causal, N = {n:,} in {len(lengths)} documents, H = {heads}, "
        f"D = {dim}, w = {list(ws)}, r = {list(rs)}",
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problems, one rep")
    parser.add_argument("--skip-flex", action="store_true", help="do not run FlexAttention")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=64 * 2**20,
        help="first N tried by the largest-forward probe (default 64M)",
    )
    parser.add_argument("--skip-packed", action="store_true", help="do not time packed documents")
    parser.add_argument(
        "--engines",
        default="cuda_flash,cuda_cudnn,cuda_efficient,fused",
        help="comma-separated engines to time (default: all CUDA engines)",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available() or not longnet.HAS_CUDA:
        sys.exit("bench_gpu: needs a CUDA device and longnet built with CUDA")
    log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    reps = 1 if args.quick else 3
    n = 16384 if args.quick else 65536
    heads, dim = 8, 128
    ws, rs = [2048, 8192, 32768], [1, 4, 16]  # w / r = 2048
    ws = [min(w, n) for w in ws]
    engines = [e for e in args.engines.split(",") if e]
    for causal in (False, True):
        compare_problem(n, heads, dim, ws, rs, causal, args.skip_flex, reps, engines)
    if not args.skip_packed:
        packed_documents(n, heads, dim, [2048, 8192], [1, 4], engines, reps, mean=n // 32)
    max_tokens = args.max_tokens // (8 if args.quick else 1)
    largest(max_tokens, [2048, 8192, 32768], [1, 4, 16], backward=False)
    largest(max_tokens // 2, [2048, 8192, 32768], [1, 4, 16], backward=True)


if __name__ == "__main__":
    main()
