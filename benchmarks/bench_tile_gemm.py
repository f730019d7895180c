#!/usr/bin/env python3
"""The rate of oneDNN's micro-kernel on the tile products of the fused CPU kernels.

The fused CPU kernels do all their matrix products through ATen's
``at::native::cpublas::brgemm`` on tiles of 64 queries and 256 keys (their sizes come
from ``torch.ops.longnet._cpu_tile_sizes()``). This script times that
call alone, one thread, C += A B on each tile shape the kernels use, A row-major and B
prepared the way the kernels prepare it (pair-interleaved for bfloat16), all operands
resident in cache. The rate it prints times the number of threads is the most the
kernels' products can reach; the kernels' own GFLOP/s (``bench_cpu.py --case peak``)
divided by it is the share of their time spent in the products.

A small C++ extension is compiled on the first run (about a minute, then cached by
torch). Shapes are (M, N, K) of C[M x N] += A[M x K] B[K x N]:

* ``S = Q K^T`` and ``dP = dO V^T``: (64, 256, D)
* ``dV^T += dO^T P`` and ``dK^T += Q^T dS``: (D, 256, 64)
* ``O += P V`` and ``dQ += dS K``: (64, D, 256)

    python3 benchmarks/bench_tile_gemm.py                    # D = 64, float32 and bfloat16
    python3 benchmarks/bench_tile_gemm.py --head-dim 128 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import machine_info, markdown_table  # noqa: E402

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>

#include <chrono>
#include <vector>

// GFLOP/s of C[m x n] += A[m x k] B[k x n] repeated for about `seconds`.
double tile_rate(int64_t m, int64_t n, int64_t k, bool bf16, double seconds) {
  std::vector<float> c(m * n, 0.f);
  auto time_it = [&](const auto* a, const auto* b) {
    auto call = [&] {
      at::native::cpublas::brgemm(m, n, k, k, n, n, true, a, b, c.data(), bf16);
    };
    for (int i = 0; i < 20; ++i) call();  // JIT compile and warm the caches
    int64_t calls = 0;
    const auto t0 = std::chrono::steady_clock::now();
    double elapsed = 0;
    while (elapsed < seconds) {
      for (int i = 0; i < 100; ++i) call();
      calls += 100;
      elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    return 2.0 * m * n * k * calls / elapsed / 1e9;
  };
  double rate;
  if (bf16) {
    std::vector<at::BFloat16> a(m * k, at::BFloat16(0.5f)), b(k * n, at::BFloat16(0.25f));
    rate = time_it(a.data(), b.data());
    at::native::cpublas::brgemm_release(true);
  } else {
    std::vector<float> a(m * k, 0.5f), b(k * n, 0.25f);
    rate = time_it(a.data(), b.data());
  }
  return rate;
}
"""


def _extension():
    from torch.utils.cpp_extension import load_inline

    return load_inline(
        "longnet_bench_tile_gemm",
        cpp_sources=_SOURCE,
        functions=["tile_rate"],
        extra_cflags=["-O2"],
    )


def tile_shapes(head_dim: int) -> list[tuple[str, int, int, int]]:
    """(products, M, N, K) of the fused kernels' tiles for head dim ``head_dim``."""
    import longnet  # noqa: F401  (registers torch.ops.longnet)

    queries, keys = torch.ops.longnet._cpu_tile_sizes()
    d = head_dim
    return [
        ("S = Q K^T, dP = dO V^T", queries, keys, d),
        ("dV^T += dO^T P, dK^T += Q^T dS", d, keys, queries),
        ("O += P V, dQ += dS K", queries, d, keys),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=0.5, help="time per shape and dtype")
    parser.add_argument("--out", default=None, help="directory for cpu_tile_gemm.json")
    args = parser.parse_args(argv)
    if args.head_dim < 2 or args.head_dim % 2:
        parser.error(f"--head-dim must be even and at least 2, got {args.head_dim}")
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        print("compiling the timing loop needs ninja: pip install ninja")
        return 1
    if not torch.backends.mkldnn.is_available():
        print("this build of torch has no oneDNN (torch.backends.mkldnn.is_available() is False)")
        return 1

    import longnet  # noqa: F401  (registers torch.ops.longnet)

    # Only the dtypes whose fused kernels run on the micro-kernel on this machine.
    dtypes = [
        name
        for name in ("float32", "bfloat16")
        if torch.ops.longnet._cpu_products_for(getattr(torch, name), args.head_dim).startswith(
            "brgemm"
        )
    ]
    if not dtypes:
        print("the fused CPU kernels run no oneDNN micro-kernel on this machine")
        return 1
    torch.set_num_threads(1)
    ext = _extension()
    records = []
    for name, m, n, k in tile_shapes(args.head_dim):
        rec: dict[str, object] = {"products": name, "M": m, "N": n, "K": k}
        for dtype in dtypes:
            rec[dtype] = ext.tile_rate(m, n, k, dtype == "bfloat16", args.seconds)
        records.append(rec)
        rates = "  ".join(f"{d} {rec[d]:7.1f}" for d in dtypes)
        print(f"{name:32s} ({m}, {n}, {k}): {rates} GFLOP/s", flush=True)

    rows = [
        [r["products"], f"({r['M']}, {r['N']}, {r['K']})"] + [f"{r[d]:.1f}" for d in dtypes]
        for r in records
    ]
    headers = ["products", "(M, N, K)"] + [f"{d} GFLOP/s" for d in dtypes]
    print("\none thread, operands in cache\n")
    print(markdown_table(headers, rows))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "cpu_tile_gemm.json")
        with open(path, "w") as f:
            json.dump(
                {"head_dim": args.head_dim, "machine": machine_info(1), "records": records},
                f,
                indent=1,
            )
        print(f"\nsaved {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
