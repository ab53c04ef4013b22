"""Weak-to-strong speed: the default pack's 135M ARMs guiding a base ~3x their size (issue 22).

    .venv/bin/python scripts/bench_weak_to_strong.py [-n 96] [--repeats 2] [--quant q4_1]

No larger SmolLM2-vocabulary model can be fetched here, so the larger base is SmolLM2-360M's
shape (32 layers, hidden 960, 15 heads / 5 KV heads, MLP 2560, tied embeddings, the same
49,152-token vocabulary), randomly initialised with transformers, converted by llama.cpp's own
converter and quantized like the pack's base (Q4_1) with llama.cpp's quantizer; it is built
once into the cache (needs the export extra: torch, transformers). Its replies are noise:
only the speed is measured, greedy with EOS ignored, so every mode decodes the same number of
tokens. Modes, interleaved in one process, best round of each:
- the 135M base alone, and guided by its pack (heads on its own layer: the pack's default);
- the 360M-shaped base alone, and guided by the same ARMs through `--base` (the tap is off
  there: the ARMs' own trunk graph runs beside the base);
- each guided mode again in the fast mode (`exact=False`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_genarm import load
from edge_genarm.guidance import SamplingParams
from edge_genarm.paths import cache_dir

PROMPTS = ("Write a short story about a lighthouse keeper.", "How was your day?",
           "Give me three tips for a job interview.")  # fmt: skip
SHAPE = dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
             num_key_value_heads=5, tie_word_embeddings=True)  # SmolLM2-360M's config  # fmt: skip
QUANTS = {"q4_1": 3, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def strong_base(quant: str) -> Path:
    """The 360M-shaped GGUF, built once (random init -> f16 GGUF -> quantized)."""
    out = cache_dir() / "bench" / f"smollm2-360m-shape-random-{quant}.gguf"
    if out.is_file():
        return out
    import tempfile

    import llama_cpp
    import torch
    from edge_genarm.export.converter import convert_hf_to_gguf
    from edge_genarm.export.gguf_tokenizer import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from edge_genarm.gguf import read_gguf
    from edge_genarm.pack import default_bundle

    small = default_bundle() / "base.gguf"
    tok = build_tokenizer(read_gguf(small))
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPE)  # fmt: skip
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(cfg).save_pretrained(Path(d) / "hf", safe_serialization=True)
        tok.save_pretrained(Path(d) / "hf")
        f16 = convert_hf_to_gguf(Path(d) / "hf", Path(d) / "f16.gguf", "f16")
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = QUANTS[quant]
        part = out.with_name(out.name + ".partial")
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(part).encode(), params) != 0:
            raise SystemExit(f"llama.cpp could not quantize {f16} to {quant}")
        part.replace(out)
    return out


def run(engine, weights: dict, n: int, exact: bool = True) -> float:
    toks = secs = 0.0
    for p in PROMPTS:
        c = engine.generate(p, max_tokens=n, sampling=SamplingParams(0.0, 0, 1.0, 0.0), seed=0, weights=weights,
                            guidance=any(weights.values()), ignore_eos=True, exact=exact)  # fmt: skip
        toks += c.timings.steps
        secs += c.timings.steps / c.timings.summary()["tok_per_s"]
    return toks / secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quant", choices=sorted(QUANTS), default="q4_1")
    a = ap.parse_args()
    from edge_genarm.pack import default_bundle

    pack, big = str(default_bundle()), strong_base(a.quant)
    small = load(pack)
    strong = load(pack, base=str(big))
    w = dict(small.weights)
    off = {k: 0.0 for k in w}
    print(f"ARMs {w} from {pack}; small base {small.base.path.name}; strong base {big.name} "
          f"({big.stat().st_size / 1e6:.0f} MB vs {small.base.path.stat().st_size / 1e6:.0f} MB)")  # fmt: skip
    modes = {"135M unguided": (small, off, True), "135M guided (pack, tapped)": (small, w, True),
             "135M guided, fast": (small, w, False), "360M-shape unguided": (strong, off, True),
             "360M-shape guided (--base)": (strong, w, True), "360M-shape guided, fast": (strong, w, False)}  # fmt: skip
    for e, ww, ex in modes.values():
        run(e, ww, 8, ex)
    best = {m: 0.0 for m in modes}
    for _ in range(a.repeats):
        for m, (e, ww, ex) in modes.items():
            best[m] = max(best[m], run(e, ww, a.n, ex))
    for m, v in best.items():
        ref = best["135M unguided"] if m.startswith("135M") else best["360M-shape unguided"]
        print(f"{m:<30} {v:7.1f} tok/s  {v / ref:5.2f}x its base unguided")
    print(f"strong base unguided / small base unguided: {best['360M-shape unguided'] / best['135M unguided']:.2f}")


if __name__ == "__main__":
    main()
