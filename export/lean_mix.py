"""The pack's mix head (backends/mix.py), built without torch from the committed mix adapter.

The recipe's `[mix] adapter` folder holds what `edge-genarm train-mix` wrote (export/train_mix.py):
mix.safetensors and mix.json. The head is the base's layers first..L-1 (dequantized in numpy)
with the gated LoRAs as float nodes beside them and the 'alpha' input; it is checked against a
numpy forward of the base with the LoRAs merged at a mid alpha (`parity`), quantized like the
recipe's heads (the LoRAs stay float), and the quantized graph's KL to the float one on the
probe prompts is recorded and must stay under MAX_KL, else the next form is tried (int8, fp32).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from edge_genarm.errors import BundleError

MIX_FILE = "mix/mix.onnx"
# nats, quantized vs float mix head, mean over the probe prompts' positions, at each vertex and
# the mid point. The separate heads' int4 forms measure KL 0.20 to fp32 on their held-out pairs
# and keep their held-out accuracy within 0.01 (the pack's gate); the mix head's int4 form
# measured 0.096, int8 0.002: int4 is kept, and the eval measures what it keeps (docs/speed.md).
MAX_KL = 0.25
# The merged head (backends/mix_merge.py): its expected ends per held-out reply within 10% of
# the float head's at every probed alpha (measured on the default pack: merged without the bias
# 22% fewer ends than the ARMs at concise=1, which cost a quarter of the length objective's gain).
MAX_ENDS = 0.10
CALIB_FILE = "mix/mix-calib.npz"
# ... at the alphas where the float head ends a held-out reply at least this often (at the
# positive vertex and the even mix of the default pack it does so ~0.00-0.01 times a reply).
ENDS_FLOOR = 0.1
CALIB_PAIRS, CHECK_PAIRS, MAX_SEQ, CHECK_STRIDE = 8, 8, 256, 6


def read_mix(adapter: Path):
    """(mix.json, {(layer, matrix): (A, B)}) of a train-mix folder."""
    from edge_genarm.export.numpy_build import read_safetensors

    info_p, w_p = adapter / "mix.json", adapter / "mix.safetensors"
    if not info_p.is_file() or not w_p.is_file():
        raise BundleError(f"'{adapter}' holds no mix head (mix.json, mix.safetensors): run `edge-genarm train-mix`")
    info = json.loads(info_p.read_text())
    arrays = read_safetensors(w_p)
    k = int(info["first_layer"])
    lora = {}
    for name, arr in arrays.items():
        j, rest = name.split("_", 1)
        key, which = rest.rsplit(".", 1)
        lora.setdefault((k + int(j), key), {})[which] = arr.astype(np.float32)
    return info, {key: (ab["A"], ab["B"]) for key, ab in lora.items()}


def merged_at(base, info: dict, lora: dict, alpha) -> object:
    """The base's weights with every gated LoRA merged at `alpha` (the reference the graph is checked against)."""
    from edge_genarm.export.compact import LlamaWeights

    gate = np.repeat(np.asarray(alpha, dtype=np.float64), int(info["rank"])) * float(info["scale"])
    layers = list(base.layers)
    for (i, key), (a, b) in lora.items():
        layers[i] = dict(layers[i])
        delta = (b.astype(np.float64) * gate[None, :]) @ a.astype(np.float64)  # (out, in)
        layers[i][key] = (layers[i][key].astype(np.float64) + delta.T).astype(np.float32)
    return LlamaWeights(base.embed, layers, base.norm, base.lm_head, base.inv_freq, base.eps, base.n_heads, base.n_kv)


def mix_graph(base, info: dict, lora: dict, meta: dict):
    from edge_genarm.export.compact import MixLoRA, build

    mix = MixLoRA(len(info["objectives"]), int(info["rank"]), float(info["scale"]), lora)
    return build(base, int(info["first_layer"]), len(base.layers), False, "normed", meta, mix=mix)


def head_logits(path: Path, hidden: np.ndarray, alpha, lm_head: np.ndarray) -> np.ndarray:
    """The graph at `path` on `hidden` (seq, d) at `alpha`: logits (seq, vocab), float64."""
    import onnxruntime as ort

    from edge_genarm.backends.mix_merge import head_feed
    from edge_genarm.backends.onnx_arm import session_options

    s = ort.InferenceSession(str(path), session_options(2), providers=["CPUExecutionProvider"])
    normed = s.run(["normed"], head_feed(s, hidden, alpha))[0][0]
    return normed.astype(np.float64) @ lm_head.astype(np.float64)


def _kl(ref: np.ndarray, got: np.ndarray) -> float:
    from edge_genarm.guidance import log_softmax

    lp, lq = (np.stack([log_softmax(r) for r in x]) for x in (ref, got))
    return float(np.sum(np.exp(lp) * (lp - lq), axis=-1).mean())


def _kinds(share: dict) -> list[str]:
    """The quantized forms to try, as the share stage tries the heads' (lean_share.attempts):
    `heads` (when set) then each `quantize` kind."""
    out: list[str] = []
    for kind in share.get("quantize", []):
        for k in (share.get("heads"), kind):
            if k and k not in out:
                out.append(k)
    return out


def mix_stage(bundle: Path, gguf: Path, recipe: dict, log=print) -> dict:
    """Build, check, quantize and install the mix head; returns its manifest entry."""
    from edge_genarm.export.bundle_write import file_record, scratch_dir
    from edge_genarm.export.lean_pack import base_weights
    from edge_genarm.export.numpy_build import numpy_forward
    from edge_genarm.export.onnx_io import save_model
    from edge_genarm.export.pack_record import probe_seqs
    from edge_genarm.export.quantize import quantize_model

    from edge_genarm.manifest import read_manifest, write_manifest

    spec = recipe["mix"]
    info, lora = read_mix(Path(recipe["_dir"]) / spec["adapter"])
    m = read_manifest(bundle)
    (key,) = m["trunks"]
    missing = [o for o in info["objectives"] if o not in m.get("arms", {})]
    if missing:
        raise BundleError(f"the mix head was trained for {', '.join(missing)}, which this pack has no ARM for")
    base = base_weights(gguf)
    k = int(info["first_layer"])
    meta = {"edge_genarm_trunk": key, "part": "mix", "objectives": ",".join(info["objectives"]), "first_layer": k}
    try:
        p, w, _ = probe_seqs(recipe, bundle)[1]
        ids = list(p) + list(w)
    except Exception:  # no tokenizer and nothing recorded: any ids exercise the same arithmetic
        ids = list(range(100, 148))
    hidden = numpy_forward(base, ids, upto=k)
    mid = [1.0 / len(info["objectives"])] * len(info["objectives"])
    ref = numpy_forward(merged_at(base, info, lora, mid), ids)
    share = recipe["share"]
    with scratch_dir(bundle, "mix") as tmp:
        f32 = Path(tmp) / "mix-f32.onnx"
        save_model(mix_graph(base, info, lora, meta), f32)
        got = head_logits(f32, hidden, mid, base.lm_head)
        parity = {"reference": "numpy forward, LoRAs merged at alpha " + str(mid), "positions": len(ids),
                  "mean_kl": _kl(ref, got), "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean())}  # fmt: skip
        log(f"mix head (fp32) vs numpy: KL {parity['mean_kl']:.2e}, top-1 {parity['top1_agreement']:.3f}")
        if not (parity["mean_kl"] <= 1e-3 and parity["top1_agreement"] >= 0.99):
            raise BundleError(f"the mix head's graph disagrees with its merged weights ({parity}): report this pack")
        chosen = None
        for kind in [*_kinds(share), None]:  # the heads' forms, in the order the share stage tries them
            if kind is None:
                chosen, path, kl = None, f32, 0.0
                break
            import onnx

            q = quantize_model(onnx.load(str(f32)), kind, share.get("block_size", 32), share.get("accuracy_level", 4),
                               "the mix head", copy=False)  # fmt: skip
            path = Path(tmp) / f"mix-{kind}.onnx"
            save_model(q, path)
            kls = {str(a): _kl(head_logits(f32, hidden, a, base.lm_head), head_logits(path, hidden, a, base.lm_head))
                   for a in ([1.0, 0.0], mid, [0.0, 1.0])[: 3 if len(mid) == 2 else 1]}  # fmt: skip
            kl = max(kls.values())
            log(f"mix head {kind}: KL to fp32 {', '.join(f'{a} {v:.4f}' for a, v in kls.items())}")
            if kl <= MAX_KL:
                chosen = kind
                break
            log(f"mix head {kind}: KL {kl:.3f} > {MAX_KL}: trying the next form")
        (bundle / MIX_FILE).parent.mkdir(parents=True, exist_ok=True)
        merged = _merged_gate(path, gguf, f32, hidden, mid, base.lm_head, Path(tmp), log,
                              calib=_calibrate(path, gguf, recipe, info["objectives"], k - 1, bundle / CALIB_FILE, log))
        if merged.get("calibration"):
            m["files"][CALIB_FILE] = file_record(bundle / CALIB_FILE)
        shutil.move(str(path), bundle / MIX_FILE)
    m["files"][MIX_FILE] = file_record(bundle / MIX_FILE)
    m["mix"] = {
        "file": MIX_FILE, "trunk": key, "objectives": info["objectives"], "first_layer": k, "tap_layer": k - 1,
        "rank": info["rank"], "quantize": chosen or "fp32", "kl_to_fp32": kl, "parity": parity, "merged": merged,
        "training": {x: info.get(x) for x in ("held_out", "held_out_init", "epochs", "seconds", "per_objective")},
        "source": str(Path(recipe["_dir"]) / spec["adapter"]),
    }  # fmt: skip
    write_manifest(bundle, m)
    log(f"mix head: layers {k}-{len(base.layers) - 1}, {', '.join(info['objectives'])}, {chosen or 'fp32'}")
    return m["mix"]


def _calibrate(path: Path, gguf: Path, recipe: dict, objectives, layer: int, out: Path, log):
    """(the calibration file, the check sequences' hidden states and reply starts, the end ids), or
    None: each projection's mean input at each objective's vertex over the first held-out pairs
    (heldout.json; the base's own layer `layer` read through llama.cpp), saved to `out` for the
    merge's bias (backends/mix_merge.py); the next held-out pairs are kept to check the merged
    head's ends of replies. None where there are no held-out pairs or no tap."""
    from edge_genarm.export.pack_record import HELDOUT

    from edge_genarm.backends.capture import CaptureUnavailable
    from edge_genarm.backends.mix_merge import MergeError, input_means, save_calibration

    p = Path(recipe["_dir"]) / HELDOUT
    arms = json.loads(p.read_text()).get("arms", {}) if p.is_file() else {}
    calib, check = [], []
    for o in objectives:
        pairs = arms.get(o, {}).get("pairs", [])
        n = min(CALIB_PAIRS, len(pairs) // 2)
        for i, e in enumerate(pairs[: n + CHECK_PAIRS]):
            for reply in e[1:3]:
                (calib if i < n else check).append((list(e[0]), list(reply)[: max(0, MAX_SEQ - len(e[0]))]))
    if not calib or not check:
        log("mix head merged: no held-out pairs to calibrate on (heldout.json): merged without a bias")
        return None
    from edge_genarm.backends.llama_base import LlamaBase

    try:
        base = LlamaBase(gguf, n_ctx=2 * MAX_SEQ, tap=layer)
    except CaptureUnavailable as e:
        log(f"mix head merged: no base tap ({e}): merged without a bias")
        return None

    def states(seqs):
        out = []
        for prompt, reply in seqs:
            base.reset()
            base.prefill(prompt + reply)
            out.append(np.array(base.hidden, dtype=np.float32))
        return out

    h_calib, h_check = states(calib), states(check)
    eos = sorted(base.eos_ids)
    n_obj = len(objectives)
    try:
        save_calibration(out, [input_means(path, h_calib, np.eye(n_obj, dtype=np.float32)[i]) for i in range(n_obj)])
    except MergeError as e:
        log(f"mix head merged: calibration failed ({e}): merged without a bias")
        return None
    return out, [(h, len(prompt)) for h, (prompt, _) in zip(h_check, check)], eos


def _ends(path: Path, checks, alpha, lm_head, eos) -> float:
    """The expected number of ends per check reply under the head at `path` alone: the probability
    of an end id, summed over every CHECK_STRIDE-th reply position, averaged over the replies."""
    import onnxruntime as ort

    from edge_genarm.backends.mix_merge import head_feed
    from edge_genarm.backends.onnx_arm import session_options

    s = ort.InferenceSession(str(path), session_options(2), providers=["CPUExecutionProvider"])
    lm = lm_head.astype(np.float32)
    total = 0.0
    for h, start in checks:
        normed = s.run(["normed"], head_feed(s, h, alpha))[0][0]
        z = (normed[max(start - 1, 0) :: CHECK_STRIDE] @ lm).astype(np.float64)
        lse = np.logaddexp.reduce(z, axis=-1)
        total += float(np.exp(np.logaddexp.reduce(z[:, eos], axis=-1) - lse).sum()) * CHECK_STRIDE
    return total / len(checks)


def _merged_gate(path: Path, gguf: Path, f32: Path, hidden, mid, lm_head, tmp: Path, log, calib=None) -> dict:
    """The fast mode runs the head merged at each alpha (backends/mix_merge.py): the LoRAs added to
    the base's float weights, quantized as `path` was, the mean error of each projection taken
    back as its bias where the pack has calibration (`_calibrate`). Its KL to the float head at the
    vertices and the mid point, as the quantized head's own is measured above, and its expected
    ends per held-out reply against the float head's (a length objective lives in them, and KL
    over the vocabulary barely sees them); `passed` (KL <= MAX_KL, ends within MAX_ENDS) lets the
    runtime merge, else it runs the head as shipped."""
    from edge_genarm.export.onnx_io import save_model

    from edge_genarm.backends.mix_merge import MergeError, calibration_at, merged_model

    kls, ends = {}, {}
    for a in ([1.0, 0.0], mid, [0.0, 1.0])[: 3 if len(mid) == 2 else 1]:
        try:
            x_mean = calibration_at(calib[0], a) if calib else None
            m = merged_model(path, gguf, np.asarray(a, dtype=np.float32), x_mean=x_mean)
        except MergeError as e:
            log(f"mix head merged: not possible ({e})")
            return {"passed": False, "why": str(e)}
        save_model(m, tmp / "mix-merged.onnx")
        kls[str(a)] = _kl(head_logits(f32, hidden, a, lm_head), head_logits(tmp / "mix-merged.onnx", hidden, a, lm_head))
        if calib:
            ends[str(a)] = {"float": _ends(f32, calib[1], a, lm_head, calib[2])}
            if ends[str(a)]["float"] >= ENDS_FLOOR:  # else there is nothing to keep
                ends[str(a)]["merged"] = _ends(tmp / "mix-merged.onnx", calib[1], a, lm_head, calib[2])
    kl = max(kls.values())
    log(f"mix head merged at an alpha: KL to fp32 {', '.join(f'{a} {v:.4f}' for a, v in kls.items())}")
    rec = {"kl_to_fp32": kl, "at": kls, "passed": kl <= MAX_KL, "calibration": CALIB_FILE if calib else None}
    if ends:
        gated = [e for e in ends.values() if "merged" in e]  # where the float head ends replies at all
        worst = max((abs(e["merged"] / e["float"] - 1) for e in gated), default=0.0)
        log("mix head merged at an alpha: ends per held-out reply, float -> merged "
            + ", ".join(f"{a} {e['float']:.3f} -> {e.get('merged', float('nan')):.3f}" for a, e in ends.items()))  # fmt: skip
        rec.update(ends=ends, ends_rel_err=worst, passed=rec["passed"] and worst <= MAX_ENDS)
    return rec


def ensure_mix(bundle: Path, gguf: Path, recipe: dict, log=print) -> None:
    """The pack build's "mix head" stage (both build paths): `mix_stage` unless the bundle has one."""
    from edge_genarm.manifest import read_manifest

    if "mix" not in read_manifest(bundle):
        mix_stage(bundle, gguf, recipe, log)
