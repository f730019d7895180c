#!/usr/bin/env python3
"""Continue a prompt with a trained byte-level LongNet LM (KV-cached decoding).

python examples/generate.py runs/longnet_lm --prompt "def main(" --max-new-tokens 300
python examples/generate.py runs/longnet_lm/checkpoint --greedy
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

# Idle OpenMP threads sleep instead of spinning: on a busy or shared CPU spinning
# threads slow every parallel region down several times. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

try:
    import longnet  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from longnet.model import CONFIG_NAME, LongNetLM  # noqa: E402
from longnet.tokenizer import ByteTokenizer  # noqa: E402


def find_model_dir(path: str) -> str:
    """``path`` itself when it holds config.json, else ``path/checkpoint``."""
    for candidate in (path, os.path.join(path, "checkpoint")):
        if os.path.isfile(os.path.join(candidate, CONFIG_NAME)):
            return candidate
    raise SystemExit(
        f"no {CONFIG_NAME} in {path!r} or {os.path.join(path, 'checkpoint')!r}: "
        "pass a train_lm.py --out-dir or a save_pretrained directory"
    )


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("model_dir", help="train_lm.py --out-dir or a save_pretrained directory")
    p.add_argument("--prompt", default="import os\n\n\ndef ")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--greedy", action="store_true", help="arg-max decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute the whole prefix every step (slow; for checking)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    model = LongNetLM.from_pretrained(find_model_dir(args.model_dir), map_location=args.device)
    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode(args.prompt, add_bos=True)], device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    t0 = time.time()
    out = model.generate(
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        greedy=args.greedy,
        eos_token_id=tok.eos_token_id,
        use_cache=not args.no_cache,
        generator=gen,
    )
    dt = time.time() - t0
    text = tok.decode(out[0].tolist())
    print(text)
    new = out.shape[1] - ids.shape[1]
    print(f"\n[{new} tokens in {dt:.2f} s, {new / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
