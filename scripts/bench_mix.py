"""What one step of the mix head costs, by form: with and without its LoRA nodes, int4 and int8,
one and two onnxruntime threads (onnxruntime alone, 80 positions cached, median of 100 steps).

    .venv/bin/python scripts/bench_mix.py [--pack default]

The graphs are built here from the pack's recipe (the base GGUF dequantized, the committed mix
adapter), as the pack build does (export/lean_mix.py); "plain" is the same 4 layers without the
gated LoRAs (what the head would cost if the LoRAs were free).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import onnx
    from edge_genarm.export.compact import build
    from edge_genarm.export.lean_mix import mix_graph, read_mix
    from edge_genarm.export.lean_pack import base_weights
    from edge_genarm.export.onnx_io import save_model
    from edge_genarm.export.quantize import quantize_model

    from edge_genarm.backends.mix import _MixGraph
    from edge_genarm.backends.trunk import _Head
    from edge_genarm.pack import fetch_base, load_recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", default="default")
    a = ap.parse_args()
    recipe = load_recipe(a.pack)
    base = base_weights(fetch_base(recipe["base"]))
    info, lora = read_mix(Path(recipe["_dir"]) / recipe["mix"]["adapter"])
    k = int(info["first_layer"])
    rng = np.random.default_rng(0)
    hidden = rng.normal(0, 1, (1, 200, base.embed.shape[1])).astype(np.float32)
    alpha = {"alpha": np.full(len(info["objectives"]), 1 / len(info["objectives"]), np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        graphs = {"mix": mix_graph(base, info, lora, {}), "plain": build(base, k, len(base.layers), False, "normed", {})}
        for name, g in graphs.items():
            save_model(g, out / f"{name}-f32.onnx")
            for kind in ("int4", "int8"):
                save_model(quantize_model(onnx.load(str(out / f"{name}-f32.onnx")), kind, 32, 4, name, copy=False),
                           out / f"{name}-{kind}.onnx")  # fmt: skip
        for name in ("mix-int4", "mix-int8", "plain-int4", "plain-int8"):
            for threads in (1, 2):
                is_mix = name.startswith("mix")
                g = (_MixGraph if is_mix else _Head)(out / f"{name}.onnx", name, threads=threads, cache=False)
                extra = {"extra": alpha} if is_mix else {}
                g.feed(list(range(80)), hidden[:, :80], **extra)
                ts = []
                for i in range(80, 180):
                    t0 = time.perf_counter()
                    g.feed([i], hidden[:, i : i + 1], **extra)
                    ts.append(time.perf_counter() - t0)
                print(f"{name:<11} {threads} thread(s): {1e3 * np.median(ts):.2f} ms per position (median of 100)")


if __name__ == "__main__":
    main()
