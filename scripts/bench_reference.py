"""The GenARM reference way on a CPU, as a benchmark: transformers + torch, same weights, same math.

    .venv/bin/python scripts/bench_reference.py [-n 64] [--arm positive=0.5 --arm concise=0.5]

Base: the default pack's SmolLM2-135M GGUF dequantized to fp32 by transformers. ARMs: the
base + the pack's committed LoRA adapters, merged (what the pack's ARMs are). Each model
keeps its KV cache; per step log_softmax(base) + sum_i w_i log_softmax(arm_i), greedy, EOS
ignored: the work `edge-genarm bench` does. Prints tok/s unguided and guided, so the two
compare on one machine (quote ratios from runs made one after the other).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's test fixtures (tests/tiny.py) find the SmolLM2 GGUF


def load_models(arms: dict[str, float]):
    import torch
    from edge_genarm.export.sources import load_source
    from peft import PeftModel

    from tests.tiny import smollm2_gguf

    base, tok = load_source(smollm2_gguf())
    out = {}
    for name in arms:
        adapter = ROOT / "models" / "default-pack" / "adapters" / name
        with torch.no_grad():
            out[name] = PeftModel.from_pretrained(copy.deepcopy(base), adapter).merge_and_unload().eval()
    return base.eval(), out, tok


def decode(base, arms: dict, weights: dict[str, float], ids: list[int], n: int) -> float:
    """tok/s of n greedy steps of log p_base + sum w log p_arm, every model with its KV cache."""
    import torch

    models = {"base": base, **arms}
    past = {k: None for k in models}
    x = torch.tensor([ids])
    t0 = None
    with torch.no_grad():
        for step in range(n + 1):
            if step == 1:
                t0 = time.perf_counter()  # the prompt is not timed, as in `edge-genarm bench`
            if step == n:
                break
            scores = None
            for k, m in models.items():
                o = m(input_ids=x, past_key_values=past[k], use_cache=True)
                past[k] = o.past_key_values
                lp = torch.log_softmax(o.logits[0, -1].float(), -1)
                scores = lp if scores is None else scores + weights[k] * lp
            x = scores.argmax().view(1, 1)
    return (n - 1) / (time.perf_counter() - t0)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--arm", action="append", default=[], help="NAME=WEIGHT (default positive=0.5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    weights = dict((s.split("=")[0], float(s.split("=")[1])) for s in (a.arm or ["positive=0.5"]))
    base, arms, tok = load_models(weights)
    text = tok.apply_chat_template(
        [{"role": "user", "content": a.prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False).input_ids
    unguided = decode(base, {}, {}, ids, a.n)
    guided = decode(base, arms, weights, ids, a.n)
    print(f"torch reference ({a.threads} threads, {a.n} tokens): unguided {unguided:.1f} tok/s, "
          f"guided {weights} {guided:.1f} tok/s")  # fmt: skip


if __name__ == "__main__":
    main()
