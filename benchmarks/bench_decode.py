#!/usr/bin/env python3
"""Decoding at long context: per-token latency, prefill time and cache bytes against
context length, for dense attention and for dilated attention with each cache.

Model: SmolLM2-135M-Instruct from ``longnet.integrations.smollm2.load_smollm2``
(offline; float32; 30 layers, 9 query / 3 key-value heads of 64: 46,080 bytes of keys
and values per token in float32).

Text: the held-out ``.py`` files of the running Python's standard library
(``longnet.data.split_by_file``, as ``benchmarks/context_extension.py``), tokenized
and concatenated. At each context length ``L`` the prompt is the first ``L`` tokens;
then ``--new-tokens`` tokens are decoded one at a time, teacher-forced (each step feeds
the text's next token, which costs what feeding the greedy token costs and gives the
perplexity through the cache on the same targets for every variant).

Variants (``--variants``):

* ``sdpa``: dense attention with transformers' ``DynamicCache`` (every key);
* ``dilated-full``: ``--segment-lengths`` / ``--dilation-rates`` with the same
  ``DynamicCache`` (what ``generate`` used before ``DilatedAttentionCache``);
* ``dilated``: the same patterns with ``DilatedAttentionCache`` (only the keys a later
  query can read: ``lcm(w) - 1`` tokens plus the current ones, or, for patterns whose
  segments grow to cover the context, each pattern's current segment at the offsets
  its heads read; the ``storage`` column says which);
* ``dilated-int8``: the same in int8 (one float32 scale per token and head).

Per row: prefill seconds (the prompt in chunks of ``--prefill-chunk`` tokens through
the cache, only the last position's logits), the median and mean milliseconds of one
decoded token (a one-token forward with the cache), the cache's bytes after decoding
(allocated buffers: keys, values, scales) and the tokens it holds per layer, and the
perplexity of the ``new-tokens + 1`` teacher-forced targets. The load average is
recorded before and after each row (the CPUs may be shared). Results go to
``--out-dir``/``--name``.{json,md,png} after every row.

    python benchmarks/bench_decode.py                  # 2K and 16K, 32 tokens (the default)
    python benchmarks/bench_decode.py --long           # adds 32K and 128K
    python benchmarks/bench_decode.py --lengths 4096 --variants dilated,dilated-int8
    python benchmarks/bench_decode.py --lengths 2048 --variants dilated,dilated-int8 \
        --agreement 16 --name decode_int8_agreement_cpu     # greedy tokens int8 vs float
    python benchmarks/bench_decode.py --covering --lengths 8192,32768,131072 \
        --variants dilated,dilated-int8,dilated-full --name decode_covering_cpu
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

# Idle OpenMP threads sleep instead of spinning (shared CPUs). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import longnet  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import finetune_transformers as ft  # noqa: E402  (examples/finetune_transformers.py)
import transformers  # noqa: E402
from common import machine_info, markdown_table, save_results  # noqa: E402  (benchmarks/common.py)

import longnet.integrations.transformers as lt  # noqa: E402
from longnet.cli import choice_list, int_list  # noqa: E402
from longnet.data import split_by_file, stdlib_source_files  # noqa: E402
from longnet.integrations.smollm2 import load_smollm2  # noqa: E402

VARIANTS = ("sdpa", "dilated-full", "dilated", "dilated-int8")
LONG_LENGTHS = [32768, 131072]


def make_cache(variant: str, model: Any) -> Any:
    """The cache a variant decodes with."""
    if variant in ("sdpa", "dilated-full"):
        return transformers.DynamicCache(config=model.config)
    return lt.DilatedAttentionCache(model.config, int8=variant == "dilated-int8")


def cache_bytes(cache: Any) -> int:
    """Bytes of the cache's tensors (allocated, held or not)."""
    if isinstance(cache, lt.DilatedAttentionCache):
        return cache.nbytes
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (layer.keys, layer.values)
        if t is not None
    )


def held_tokens(cache: Any) -> int:
    """Tokens the first layer holds."""
    if isinstance(cache, lt.DilatedAttentionCache):
        return cache.held(0)
    return int(cache.layers[0].keys.shape[-2])


def storage(cache: Any) -> str:
    """How the first layer holds its keys: every key, the last lcm(w) - 1 tokens
    ("period"), or per pattern ("pattern": then the held count is rows per head)."""
    if not isinstance(cache, lt.DilatedAttentionCache):
        return "every key"
    layer = cache.layers[0]
    if isinstance(layer, lt.DilatedPatternLayer):
        return "pattern" if layer.per_pattern else "pattern (every key so far)"
    return "period"


@torch.no_grad()
def measure(model: Any, cache: Any, tokens: torch.Tensor, length: int, chunk: int) -> dict:
    """Prefill ``tokens[:, :length]`` in chunks, then feed the next tokens one at a time.

    ``tokens`` is ``(1, length + new + 1)``; returns the row's timings, cache size and
    the teacher-forced negative log-likelihoods of tokens ``length .. length + new``.
    """
    new = tokens.shape[1] - length - 1
    t0 = time.perf_counter()
    for i in range(0, length, chunk):
        out = model(tokens[:, i : min(i + chunk, length)], cache=cache, logits_to_keep=1)
    prefill_s = time.perf_counter() - t0
    logits = out.logits[:, -1]
    nll = [F.cross_entropy(logits.float(), tokens[:, length]).item()]
    times = []
    for j in range(new):
        step = tokens[:, length + j : length + j + 1]
        t0 = time.perf_counter()
        logits = model(step, cache=cache).logits[:, -1]
        times.append(time.perf_counter() - t0)
        nll.append(F.cross_entropy(logits.float(), tokens[:, length + j + 1]).item())
    return {
        "prefill_s": prefill_s,
        "decode_ms_median": 1e3 * statistics.median(times),
        "decode_ms_mean": 1e3 * statistics.fmean(times),
        "decode_ms": [round(1e3 * t, 3) for t in times],
        "cache_bytes": cache_bytes(cache),
        "cache_tokens_per_layer": held_tokens(cache),
        "storage": storage(cache),
        "seen_tokens": cache.get_seq_length(),
        "nll_mean": statistics.fmean(nll),
        "ppl": math.exp(statistics.fmean(nll)),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--lengths", type=int_list, default=[2048, 16384], help="context lengths")
    p.add_argument("--long", action="store_true", help=f"add {LONG_LENGTHS} to --lengths")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per row")
    p.add_argument("--variants", type=choice_list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--segment-lengths", type=int_list, default=[2048, 4096, 8192])
    p.add_argument("--dilation-rates", type=int_list, default=[1, 2, 4])
    p.add_argument(
        "--covering",
        action="store_true",
        help="patterns covering 128K: segments 2K .. 128K, rates 1 .. 64 (replaces the above)",
    )
    p.add_argument("--prefill-chunk", type=int, default=4096, help="prefill chunk (tokens)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--name", default="decode_cpu", help="result file name (no extension)")
    p.add_argument(
        "--agreement",
        type=int,
        default=0,
        metavar="N",
        help="also: greedy tokens of N held-out prompts with each dilated cache against the "
        "float one (how often int8 changes what generate returns)",
    )
    p.add_argument("--agreement-length", type=int, default=1024, help="tokens per prompt")
    p.add_argument("--quiet", action="store_true")
    return p


@torch.no_grad()
def greedy_agreement(
    model: Any, stream: torch.Tensor, variants: list[str], n: int, length: int, new: int
) -> dict[str, Any]:
    """``n`` prompts of ``length`` tokens (evenly spaced windows of ``stream``), ``new``
    greedy tokens each with every variant's cache: per variant, the prompts whose
    tokens equal the ``dilated`` (float) cache's, and the first differing step of the
    others."""
    starts = torch.linspace(0, stream.shape[1] - length - 1, n).long().tolist()
    tokens: dict[str, list[list[int]]] = {}
    for variant in variants:
        tokens[variant] = []
        for s in starts:
            prompt = stream[:, s : s + length]
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                cache=make_cache(variant, model),
            )
            tokens[variant].append(out[0, length:].tolist())
    base = tokens["dilated"]
    result: dict[str, Any] = {"prompts": n, "prompt_tokens": length, "new_tokens": new}
    for variant in variants:
        if variant == "dilated":
            continue
        firsts = [
            next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            for a, b in zip(tokens[variant], base)
        ]
        result[variant] = {
            "same": sum(f is None for f in firsts),
            "first_difference": [f for f in firsts if f is not None],
        }
    return result


def table(results: dict[str, Any]) -> str:
    first = {}
    for r in results["rows"]:
        first.setdefault(r["variant"], r)
    rows = []
    for r in results["rows"]:
        base = first[r["variant"]]
        rows.append(
            [
                r["variant"],
                r.get("storage", ""),
                f"{r['length']:,}",
                f"{r['prefill_s']:.1f}",
                f"{r['decode_ms_median']:.1f}",
                f"{r['decode_ms_median'] / base['decode_ms_median']:.2f}x",
                f"{r['cache_bytes'] / 2**20:.1f}",
                f"{r['cache_tokens_per_layer']:,}",
                f"{r['ppl']:.3f}",
            ]
        )
    headers = [
        "variant",
        "storage",
        "context",
        "prefill s",
        "decode ms/token",
        f"vs {first[results['rows'][0]['variant']]['length']:,}",
        "cache MiB",
        "held/layer (pattern: rows/head)",
        f"ppl ({results['new_tokens'] + 1} tokens)",
    ]
    text = markdown_table(headers, rows)
    agree = results.get("agreement")
    if agree:
        got = agree["dilated-int8"]
        text += (
            f"\n\nGreedy tokens, int8 against the float cache: {got['same']} of "
            f"{agree['prompts']} prompts of {agree['prompt_tokens']:,} tokens identical over "
            f"{agree['new_tokens']} new tokens (first differences at steps "
            f"{got['first_difference']})."
        )
    return text


def plot(results: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in VARIANTS:
        rows = [r for r in results["rows"] if r["variant"] == variant]
        if not rows:
            continue
        xs = [r["length"] for r in rows]
        ax1.plot(xs, [r["decode_ms_median"] for r in rows], "o-", label=variant)
        ax2.plot(xs, [r["cache_bytes"] / 2**20 for r in rows], "o-", label=variant)
    for ax, ylabel in ((ax1, "decode ms / token (median)"), (ax2, "cache MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax2.set_yscale("log")
    ax1.set_ylim(bottom=0)  # ratios read off the plot as they are
    ax1.legend()
    ws, rs = results["segment_lengths"], results["dilation_rates"]
    fig.suptitle(
        f"SmolLM2-135M float32 decoding, dilated {ws} / {rs}, {results['threads']} threads"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    log = (lambda *a, **k: None) if args.quiet else print
    lengths = sorted(set(args.lengths + (LONG_LENGTHS if args.long else [])))
    if args.covering:
        args.segment_lengths = [2048 << i for i in range(7)]
        args.dilation_rates = [1 << i for i in range(7)]
    torch.set_num_threads(max(1, args.threads))
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model, tokenizer = load_smollm2(torch.float32)
    root, files = stdlib_source_files()
    _, val_files = split_by_file(files, root)
    need = max(lengths + [args.agreement_length]) + args.new_tokens + 1
    stream = ft.encode_with_tokenizer(val_files, tokenizer, max_bytes=8 * need)
    if stream.size < need:
        raise SystemExit(f"the held-out text has {stream.size:,} tokens, fewer than {need:,}")
    tokens = torch.from_numpy(stream[:need]).to(torch.long)[None]
    tokens_all = torch.from_numpy(stream).to(torch.long)[None]
    results: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), float32",
        "text": f"held-out .py files of the standard library ({root}), split_by_file 5 %",
        "lengths": lengths,
        "new_tokens": args.new_tokens,
        "segment_lengths": args.segment_lengths,
        "dilation_rates": args.dilation_rates,
        "prefill_chunk": args.prefill_chunk,
        "threads": args.threads,
        "command": " ".join(sys.argv),
        "machine": machine_info(args.threads),
        "load_average_start": os.getloadavg(),
        "rows": [],
    }
    for variant in [v for v in VARIANTS if v in args.variants]:
        if variant == "sdpa":
            model.set_attn_implementation("sdpa")
        else:
            lt.enable(model, args.segment_lengths, args.dilation_rates)
        for length in lengths:
            load_before = os.getloadavg()
            cache = make_cache(variant, model)
            row = measure(
                model, cache, tokens[:, : length + args.new_tokens + 1], length, args.prefill_chunk
            )
            del cache
            row.update(
                variant=variant, length=length, load_before=load_before, load_after=os.getloadavg()
            )
            results["rows"].append(row)
            log(
                f"{variant:>13} {length:>7,}: prefill {row['prefill_s']:.1f} s, decode "
                f"{row['decode_ms_median']:.1f} ms/token, cache {row['cache_bytes'] / 2**20:.1f} "
                f"MiB ({row['cache_tokens_per_layer']:,} tokens/layer), ppl {row['ppl']:.3f}, "
                f"load {load_before[0]:.1f}"
            )
            save_results(results, args.out_dir, args.name, table, plot)
    dilated = [v for v in ("dilated", "dilated-int8") if v in args.variants]
    if args.agreement and len(dilated) == 2:
        lt.enable(model, args.segment_lengths, args.dilation_rates)
        results["agreement"] = greedy_agreement(
            model, tokens_all, dilated, args.agreement, args.agreement_length, args.new_tokens
        )
        got = results["agreement"]["dilated-int8"]
        log(
            f"greedy tokens, int8 vs float cache: {got['same']} of {args.agreement} prompts "
            f"identical over {args.new_tokens} tokens; first differences at steps "
            f"{got['first_difference']}"
        )
    results["load_average_end"] = os.getloadavg()
    save_results(results, args.out_dir, args.name, table, plot)
    log(table(results))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
