"""A pack build without torch, transformers or optimum: numpy, onnx, onnxruntime and gguf.

For a recipe whose ARMs are committed LoRA adapters sharing one trunk (the default and lite
packs), each stage of `pack build` is done from the base GGUF's own weights:

    ARM 'x'       the GGUF dequantized (numpy_build), the adapter merged -> lean/x/head.onnx (fp32)
    nudge table   the table the recipe recorded (its reward gradients need torch: measured once)
    shared trunk  the trunk and LM head from the base's weights -> quantized as the recipe says
                  (onnxruntime's quantizer); every fp32 head checked against a numpy forward
    base tap      as export/base_tap.py measures it

The graphs are export/compact.py's, built from these weights instead of from an optimum
export's. The gates run where they can change something: a build whose graphs hash as the
recipe's record (pack_record.py) copies the recorded figures, marked "recorded": true; one
whose files differ says which and runs the gates through onnxruntime.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np

from edge_genarm.errors import BundleError, EdgeGenarmError

LEAN_MODULES = ("numpy", "onnx", "onnxruntime", "gguf", "onnx_ir")
ARM_INFO = "arm.json"
_BASE: dict[str, object] = {}  # the dequantized base of this process's build (one per GGUF path)


def missing_modules() -> list[str]:
    return [m for m in LEAN_MODULES if importlib.util.find_spec(m) is None]


def why_not_lean(recipe: dict, retrain: bool = False) -> str | None:
    """None when this build can run torch-free; else why it cannot (what it would need)."""
    from edge_genarm.export.pack_record import NUDGES

    if retrain:
        return "--retrain trains the ARMs"
    if recipe.get("lean") is False:
        return "the recipe's base is not a llama GGUF (the torch-free build reads llama GGUFs only)"
    no_adapter = [a for a, s in recipe["arms"].items() if not s.get("adapter")]
    if no_adapter or not recipe["arms"]:
        return f"ARM(s) {', '.join(no_adapter) or '(none)'} have no committed adapter: they are trained"
    share = recipe.get("share") or {}
    if not share or (len(recipe["arms"]) == 1 and not share.get("layer")):
        return "the recipe shares no trunk ([share])"
    if recipe.get("nudges") and not (Path(recipe["_dir"]) / NUDGES).is_file():
        return f"the recipe's nudge table is not recorded ({NUDGES})"
    if missing_modules():
        return f"{', '.join(missing_modules())} not installed"
    return None


def base_weights(gguf: Path):
    """The base's weights, each layer dequantized when a stage reads it (numpy_build._Layer)."""
    from edge_genarm.export.numpy_build import gguf_weights

    key = str(Path(gguf).resolve())
    if key not in _BASE:
        _BASE.clear()
        _BASE[key] = gguf_weights(gguf, lazy=True)
    return _BASE[key]


def cut_layer(recipe: dict, n_layers: int) -> int:
    """The trunk's end: `[share] layer`, else the first layer any adapter changes."""
    from edge_genarm.export.numpy_build import adapted_layers

    first = min(
        min(adapted_layers(Path(recipe["_dir"]) / s["adapter"]) or [n_layers - 1]) for s in recipe["arms"].values()
    )
    layer = (recipe.get("share") or {}).get("layer")
    if layer is not None and not 0 < layer <= first:
        raise BundleError(f"[share] layer {layer}: the adapters change layer {first}; cut at {first} or lower")
    if first == 0:
        raise BundleError("an adapter changes layer 0: there is no trunk to share")
    return layer or first


def trunk_sha(w, k: int) -> str:
    """Identifies the trunk's weights, exactly as split.plan_split names a trunk cut from the torch
    build's compact graphs: per initializer that a node below layer k reads (compact.build's names),
    sha256 of its bytes and shape; their hashes in name order, hashed. Same weights, same name."""
    from edge_genarm.export.compact import MAX_POSITIONS

    pos = np.arange(MAX_POSITIONS, dtype=np.float32)[:, None] * w.inv_freq[None, :]
    arrays = {"embed_tokens": w.embed, "one_i64": np.array([1], dtype=np.int64), "norm": w.norm,
              "scalar_shape": np.array([], dtype=np.int64), "cos_cache": np.cos(pos), "sin_cache": np.sin(pos),
              "lm_head": w.lm_head}  # fmt: skip
    for i in range(k):
        arrays.update({f"l{i}.{key}": a for key, a in w.layers[i].items()})
    one = [
        hashlib.sha256(np.ascontiguousarray(arrays[n]).tobytes() + str(arrays[n].shape).encode()).hexdigest()
        for n in sorted(arrays)
    ]
    return hashlib.sha256("".join(one).encode()).hexdigest()[:16]


def cached_trunk_sha(root: Path, w, k: int) -> str:
    """trunk_sha, computed once per build (it reads every trunk weight): kept in lean/trunk.json."""
    from edge_genarm.paths import atomic_write_json

    p = root / "lean" / "trunk.json"
    rec = json.loads(p.read_text()) if p.is_file() else {}
    if rec.get("layer") != k:
        rec = {"layer": k, "sha": trunk_sha(w, k)}
        atomic_write_json(p, rec)
    return rec["sha"]


def _meta(sha: str, k: int, **more) -> dict:
    return {"edge_genarm_trunk": sha, "edge_genarm_trunk_layers": k, **more}


# ---------------------------------------------------------------------------
# the stages
# ---------------------------------------------------------------------------


def arm_stage(root: Path, gguf: Path, recipe: dict, arm: str, log=print) -> Path:
    """lean/ARM/head.onnx (fp32, layers k..L-1 + final norm) + tokens.json + arm.json; skipped when done."""
    from edge_genarm.export.compact import build
    from edge_genarm.export.numpy_build import merge_adapter
    from edge_genarm.export.onnx_io import save_model

    from edge_genarm.gguf import read_gguf
    from edge_genarm.paths import atomic_write_json

    out = root / "lean" / arm
    if (out / ARM_INFO).is_file():
        log(f"ARM '{arm}' is already exported from this source: skipping")
        return out
    spec = recipe["arms"][arm]
    adapter = Path(recipe["_dir"]) / spec["adapter"]
    log(f"ARM '{arm}': the base + the committed adapter {spec['adapter']} (numpy)")
    base = base_weights(gguf)
    k = cut_layer(recipe, len(base.layers))
    w = merge_adapter(base, adapter, f"the base '{Path(gguf).name}'")
    out.mkdir(parents=True, exist_ok=True)
    sha = cached_trunk_sha(root, base, k)
    head = build(w, k, len(w.layers), False, "normed", _meta(sha, k, part="head", arm=arm))
    save_model(head, out / "head.onnx")
    (out / "tokens.json").write_text(json.dumps(read_gguf(gguf).tokens, ensure_ascii=False))
    info = json.loads((adapter / "training.json").read_text()) if (adapter / "training.json").is_file() else {}
    atomic_write_json(out / ARM_INFO, {**info, "from_adapter": str(adapter)})  # last: the stage's mark
    return out


def trunk_pieces(root: Path, gguf: Path, recipe: dict, out: Path) -> tuple[str, int, int]:
    """out/trunk.onnx (embedding + layers < k) and out/lmhead.onnx, fp32; (sha, k, n_layers).
    Each layer is dequantized as the graph takes it: memory holds the graph, not the model too."""
    import dataclasses

    from edge_genarm.export.compact import build, lm_head_graph
    from edge_genarm.export.numpy_build import gguf_weights
    from edge_genarm.export.onnx_io import save_model

    _BASE.clear()
    w = gguf_weights(gguf, lazy=True)
    n_layers = len(w.layers)
    k = cut_layer(recipe, n_layers)
    sha = cached_trunk_sha(root, w, k)
    out.mkdir(parents=True, exist_ok=True)
    save_model(lm_head_graph(w, _meta(sha, k, part="lm_head")), out / "lmhead.onnx")
    w = dataclasses.replace(w, layers=w.layers[:k], lm_head=w.lm_head[:, :1])  # the trunk reads no LM head
    save_model(build(w, 0, k, True, "hidden", _meta(sha, k, part="trunk")), out / "trunk.onnx")
    return sha, k, n_layers


def nudge_stage(bundle: Path, recipe: dict, log=print) -> None:
    """The recorded nudge table into the bundle, with the meta it was recorded with."""
    from edge_genarm.export.bundle_write import add_file
    from edge_genarm.export.nudges import NUDGE_FILE
    from edge_genarm.export.pack_record import NUDGES, load_records

    from edge_genarm.manifest import read_manifest, write_manifest

    src = Path(recipe["_dir"]) / NUDGES
    meta = next((r["nudges"] for r in load_records(recipe) if r.get("nudges")), None) or {}
    shutil.copyfile(src, bundle / (NUDGE_FILE + ".partial"))
    (bundle / (NUDGE_FILE + ".partial")).replace(bundle / NUDGE_FILE)
    m = read_manifest(bundle)
    m["nudges"] = {**meta, "file": NUDGE_FILE, "reward_source": f"recorded with the recipe ({src})"}
    add_file(bundle, m, NUDGE_FILE)
    write_manifest(bundle, m)
    log(f"nudge table: recorded with the recipe ({meta.get('n_sites', '?')} gradient sites)")


def n_params(gguf: Path) -> int:
    """Parameters as the HF model counts them: the GGUF's tensors (a tied LM head is stored once)."""
    import gguf as gguf_lib

    return int(sum(int(t.n_elements) for t in gguf_lib.GGUFReader(gguf).tensors))


def parity(pieces: Path, name: str, head: Path, w, ids: list[int]) -> dict:
    """The fp32 trunk + head + LM head graphs (onnxruntime) against a numpy forward of `w`."""
    from edge_genarm.export.numpy_build import numpy_forward
    from edge_genarm.export.parity import THRESHOLDS

    from edge_genarm.backends.trunk import TrunkGroup
    from edge_genarm.guidance import log_softmax

    g = TrunkGroup(pieces / "trunk.onnx", {name: head}, pieces / "lmhead.onnx", threads=2, cache=False)
    got = g.sequence_logits(name, ids).astype(np.float64)
    ref = numpy_forward(w, ids)
    lp, lq = (np.stack([log_softmax(r) for r in x]) for x in (ref, got))
    kl = float(np.sum(np.exp(lp) * (lp - lq), axis=-1).mean())
    top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
    max_kl, min_top1 = THRESHOLDS["f32"]
    return {
        "type": "f32", "reference": "numpy forward of the merged weights", "positions": len(ids),
        "top1_agreement": top1, "max_abs_logit_diff": float(np.abs(ref - got).max()), "mean_kl": kl,
        "passed": kl <= max_kl and top1 >= min_top1,
    }  # fmt: skip


def require_lean(recipe: dict, retrain: bool) -> None:
    why = why_not_lean(recipe, retrain)
    if why:
        raise EdgeGenarmError(f"this pack cannot build without torch: {why}")
