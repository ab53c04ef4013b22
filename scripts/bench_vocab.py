"""Per-step costs that grow with the vocabulary: SmolLM2's 49,152 vs Gemma 3's 262,144 (issue 22).

    .venv/bin/python scripts/bench_vocab.py [--repeats 200]

Times, per decoding step, on random logits of each size (median over `--repeats`): the base's
log-softmax + entropy, the exact combine with one and two ARMs, the default sampler
(temperature 0.8, top-k 40, top-p 0.95, min-p 0.05), DRY over a 256-token history, and an ARM's
LM head: the whole int4 head in onnxruntime (MatMulNBits, block 32, accuracy level 4, one
thread, hidden 576 / 640 as in SmolLM2-135M / Gemma 3 270M) against the fast mode's restricted
head (the base's top 128 + EOS ids, numpy on the int4 rows) and the combine on those ids.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_genarm import guidance as G
from edge_genarm.backends.trunk import LMRows
from edge_genarm.backends.units import Partial
from edge_genarm.generation import combine


def med(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def lm_head(path: Path, d: int, v: int, rng) -> None:
    import onnx
    from edge_genarm.export.compact import lm_head_model
    from edge_genarm.export.share import _quantize_file

    w = (rng.standard_normal((d, v)) * 0.05).astype(np.float32)
    onnx.save(lm_head_model(w), str(path), save_as_external_data=True)
    _quantize_file(path, "int4", 32, 4)


def measure(v: int, d: int, repeats: int, rng) -> dict[str, float]:
    """The per-step figures at vocabulary `v` and hidden size `d`, in ms."""
    import onnxruntime as ort

    from edge_genarm.backends.onnx_arm import session_options

    p = G.SamplingParams(dry_multiplier=0.8)
    base = (rng.standard_normal(v) * 3).astype(np.float32)
    arms = {n: (rng.standard_normal(v) * 3).astype(np.float32) for n in ("a", "b")}
    lp, h = G.log_softmax_entropy(base)
    seq = [int(t) for t in rng.integers(0, v, 256)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lmhead.onnx"
        lm_head(path, d, v, rng)
        sess = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
        rows = LMRows(path)
    normed = rng.standard_normal((1, 1, d)).astype(np.float32)
    eos = np.array([1, 2])

    def restricted():
        ids = np.union1d(G.top_k_ids(lp, 128), eos)
        z = rows.logits(normed[0], ids)[0]
        return combine((base, {"a": Partial(ids, z, v)}), {"a": 0.5}, "base", (lp, h))

    return {
        "base log-softmax + entropy": med(lambda: G.log_softmax_entropy(base), repeats),
        "combine, one ARM (exact)": med(lambda: combine((base, arms), {"a": 0.5}, "base", (lp, h)), repeats),
        "combine, two ARMs (exact)": med(lambda: combine((base, arms), {"a": 0.5, "b": 0.5}, "base", (lp, h)), repeats),
        "sampler (T 0.8, top-k 40, top-p, min-p)": med(lambda: G.sample_u(lp, p, 0.5), repeats),
        "DRY, 256-token history": med(lambda: G.dry_penalty(lp.copy(), seq, p), repeats),
        "ARM LM head, int4, onnxruntime (exact)": med(lambda: sess.run(None, {"normed": normed}), repeats),
        "restricted LM head + combine (fast)": med(restricted, repeats),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    small, big = measure(49152, 576, a.repeats, rng), measure(262144, 640, a.repeats, rng)
    print(f"{'ms per step':<44}{'V=49,152':>10}{'V=262,144':>11}")
    for k in small:
        print(f"{k:<44}{small[k]:>10.3f}{big[k]:>11.3f}")


if __name__ == "__main__":
    main()
