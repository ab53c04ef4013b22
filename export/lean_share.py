"""The torch-free build's shared trunk and base tap, gated once (issue 23).

The pieces (export/lean_pack.py) are quantized as the recipe says: its `[share] quantize`
kinds in order, each first with its `heads`/`lm_head` kinds, then fp32, as share_fastest
tries them. For each attempt the files are hashed: when every one is what the recipe's record
(pack_record.py) says, the recorded gate figures are copied, marked "recorded": true; else the
build says which file differs and gates it on the held-out pairs, through onnxruntime (the
fp32 pieces against the quantized ones), and checks the fp32 heads against a numpy forward.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edge_genarm.errors import BundleError

TRUNK_FILES = ("trunk.onnx", "trunk.onnx_data", "lmhead.onnx", "lmhead.onnx_data")


def attempts(share: dict) -> list[tuple]:
    """(layers, heads, LM head) kinds in the order the build tries them (pack.share_fastest's)."""
    out = []
    for kind in [*share.get("quantize", []), None]:
        if kind and (share.get("heads") or share.get("lm_head")):
            out.append((kind, share.get("heads"), share.get("lm_head")))
        out.append((kind, None, None))
    return out


def kinds_of(attempt: tuple, share: dict) -> dict:
    """The trunk's manifest record of an attempt (share.share_trunk's `kinds`)."""
    kind, heads, lm = attempt
    return {
        "graph": "compact",
        "quantize": kind,
        "lm_head_quantize": (lm or kind) if kind else None,
        "heads_quantize": (heads or kind) if kind else None,
        "embedding_quantize": "int4" if kind and (share.get("embedding") or lm or kind) == "int4" else None,
    }


def _quantize(src: Path, heads: dict[str, Path], out: Path, attempt: tuple, share: dict) -> dict[str, Path]:
    """Copies of the fp32 pieces in out/, quantized as `attempt` says; {bundle-relative name: file}."""
    from edge_genarm.export.share import _quantize_file

    kind, hq, lq = attempt
    bs, al = share.get("block_size", 32), share.get("accuracy_level", 4)
    out.mkdir(parents=True)
    for f in TRUNK_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, out / f)
    for n, h in heads.items():
        (out / n).mkdir()
        for f in h.parent.glob("head.onnx*"):
            shutil.copyfile(f, out / n / f.name)
    if kind:
        lm = lq or kind
        _quantize_file(out / "trunk.onnx", kind, bs, al, embed_kind=share.get("embedding") or lm)
        _quantize_file(out / "lmhead.onnx", lm, bs, al)
        for n in heads:
            _quantize_file(out / n / "head.onnx", hq or kind, bs, al)
    return {f.name: f for f in out.iterdir() if f.is_file()} | {
        f"{n}/{f.name}": f for n in heads for f in (out / n).iterdir()
    }


def _rel(name: str, sha: str) -> str:
    """Where a piece goes in the bundle."""
    return f"arms/{name}" if "/" in name else f"trunks/{sha}/{name}"


def mismatch(record: dict | None, files: dict[str, str], kinds: dict, recipe_dir: Path) -> str | None:
    """None when `files` ({bundle path: sha256}) and `kinds` are what the recipe recorded; else why not."""
    if not record or "files" not in record:
        return f"the recipe records no build ({recipe_dir / 'recorded.json'}): running the gates"
    want = {k: v for k, v in kinds.items() if k != "graph"}
    if {k: record.get("share", {}).get(k) for k in want} != want:
        return f"the recipe recorded another quantization ({record.get('share')}): running the gates"
    for rel, sha in sorted(files.items()):
        if record.get("files", {}).get(rel) != sha:
            what = "differs from the recipe's" if rel in record.get("files", {}) else "is not in the recipe's record"
            return f"hash of {rel} {what}: running the gates"
    return None


def matching(records: list[dict], files: dict[str, str], kinds: dict, recipe_dir: Path) -> tuple[dict | None, str | None]:
    """(the recorded build whose files are `files`, None), or (None, why none is)."""
    whys = []
    for r in records:
        why = mismatch(r, files, kinds, recipe_dir)
        if why is None:
            return r, None
        whys.append(why)
    if len(whys) > 1:
        return None, f"none of the recipe's {len(whys)} recorded builds matches (the newest: {whys[0]})"
    return None, whys[0] if whys else mismatch(None, files, kinds, recipe_dir)


def _gates(fp32: Path, heads32: dict, q: dict[str, Path], seqs: dict, kind, log) -> dict:
    from edge_genarm.export.gate import format_gate, gate

    from edge_genarm.backends.trunk import TrunkGroup

    ref = TrunkGroup(fp32 / "trunk.onnx", heads32, fp32 / "lmhead.onnx", threads=2, cache=False)
    qheads = {n: q[f"{n}/head.onnx"] for n in heads32}
    got = TrunkGroup(q["trunk.onnx"], qheads, q["lmhead.onnx"], threads=2, cache=False)
    out = {}
    for n, s in seqs.items():
        g = gate(lambda ids, n=n: ref.sequence_logits(n, ids), lambda ids, n=n: got.sequence_logits(n, ids), s)
        g["type"] = kind or "f32"
        log(format_gate(n, g))
        out[n] = g
    return out


def share_stage(root: Path, bundle: Path, gguf: Path, recipe: dict, log=print) -> dict:
    """Build, quantize, gate (or copy the recorded gates) and install the shared trunk and heads."""
    from edge_genarm.export.bundle_write import scratch_dir, tidy_bundle
    from edge_genarm.export.lean_pack import base_weights, n_params, trunk_pieces
    from edge_genarm.export.pack_record import heldout_seqs, load_records

    from edge_genarm.bundle import sha256_file

    tidy_bundle(bundle)  # what a killed run left
    share, records, d = recipe["share"], load_records(recipe), Path(recipe["_dir"])
    training = {n: json.loads((root / "lean" / n / "arm.json").read_text()) for n in recipe["arms"]}
    heads32 = {n: root / "lean" / n / "head.onnx" for n in recipe["arms"]}
    with scratch_dir(bundle, "lean-share") as tmp:
        sha, k, n_layers = trunk_pieces(root, gguf, recipe, Path(tmp) / "fp32")
        log(f"trunk: layers 0-{k - 1} of {n_layers} shared by {', '.join(recipe['arms'])} (compact graphs)")
        count = n_params(gguf)  # a merged adapter changes values, not sizes  # quantizing needs the graphs only (peak memory); parity reads the base again
        checked = None  # the fp32 heads' parity, measured once when a gate runs
        for i, attempt in enumerate(attempts(share)):
            kinds = kinds_of(attempt, share)
            q = _quantize(Path(tmp) / "fp32", heads32, Path(tmp) / f"q{i}", attempt, share)
            files = {_rel(name, sha): sha256_file(p) for name, p in q.items()}
            record, why = matching(records, files, kinds, d)
            if why is None:
                log(f"files identical to the recipe's record ({len(files)} graphs): its gate figures are copied")
                gates = {n: {**record["gates"][n], "recorded": True} for n in recipe["arms"]}
                checked = {n: {**((record.get("parity") or {}).get(n) or {}), "recorded": True} for n in recipe["arms"]}
            else:
                log(why)
                if checked is None:
                    checked = _parity_all(Path(tmp) / "fp32", heads32, base_weights(gguf), recipe, bundle, d, log)
                seqs = {n: heldout_seqs(recipe, n, bundle, training[n]) for n in recipe["arms"]}
                gates = _gates(Path(tmp) / "fp32", heads32, q, seqs, attempt[0], log)
            failed = [n for n, g in gates.items() if not g["passed"]]
            if not failed:
                arms = {n: {"parity": checked[n], "gate": gates[n], "training": training[n], "n_params": count}
                        for n in recipe["arms"]}  # fmt: skip
                return _install(bundle, recipe, q, sha, k, n_layers, kinds, arms)
            log(f"ARM(s) {', '.join(failed)} failed the {attempt} gate: trying the next form")
    raise BundleError("no form of the shared trunk passed the gate (not even fp32): report this pack")


def _parity_all(fp32: Path, heads32: dict, base, recipe: dict, bundle: Path, d: Path, log) -> dict:
    from edge_genarm.export.lean_pack import parity
    from edge_genarm.export.numpy_build import merge_adapter
    from edge_genarm.export.pack_record import probe_seqs
    from edge_genarm.export.parity import format_parity

    try:
        p, w, _ = probe_seqs(recipe, bundle)[1]
        ids = list(p) + list(w)
    except Exception:  # no tokenizer and nothing recorded: any ids exercise the same arithmetic
        ids = list(range(100, 124))
    out = {}
    for n in recipe["arms"]:
        out[n] = parity(fp32, n, heads32[n], merge_adapter(base, d / recipe["arms"][n]["adapter"]), ids)
        log(format_parity(f"ARM '{n}'", out[n]))
        if not out[n]["passed"]:
            raise BundleError(f"ARM '{n}': the graphs built from the merged weights disagree with them ({out[n]})")
    return out


def _install(bundle: Path, recipe: dict, q: dict[str, Path], sha: str, k: int, n_layers: int, kinds: dict, arms) -> dict:
    """Move the pieces in, then write the manifest once (tidy_bundle drops pieces a kill left unrecorded)."""
    from edge_genarm.export.bundle_write import file_record

    from edge_genarm.manifest import read_manifest, write_manifest

    m = read_manifest(bundle)
    files = m.setdefault("files", {})
    root = bundle.parent
    for name, p in q.items():
        rel = _rel(name, sha)
        (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(p), bundle / rel)
        files[rel] = file_record(bundle / rel)
    share = recipe["share"]
    m.setdefault("trunks", {})[sha] = {
        "file": f"trunks/{sha}/trunk.onnx", "lm_head": f"trunks/{sha}/lmhead.onnx", "layers": k,
        "n_layers": n_layers, **kinds,
        "block_size": share.get("block_size", 32) if kinds["quantize"] else None,
        "accuracy_level": share.get("accuracy_level", 4) if kinds["quantize"] else None,
    }  # fmt: skip
    for n, a in arms.items():
        spec = recipe["arms"][n]
        tokens = f"arms/{n}/tokens.json"
        shutil.copyfile(root / "lean" / n / "tokens.json", bundle / tokens)
        files[tokens] = file_record(bundle / tokens)
        m.setdefault("arms", {})[n] = {
            "file": f"arms/{n}/head.onnx", "tokens": tokens, "beta_r": spec["beta_r"],
            "default_weight": spec.get("weight", 1.0),
            "source": {"path": str(Path(recipe["_dir"]) / spec["adapter"]), "kind": "gguf+lora (numpy)"},
            "parity": a["parity"], "graph": "compact", "n_layers": n_layers, "n_params": a["n_params"],
            "training": a["training"], "trunk": sha, "gate": a["gate"], "trunk_layers": k,
        }  # fmt: skip
    write_manifest(bundle, m)
    return m


def base_tap_stage(bundle: Path, recipe: dict, log=print) -> dict:
    """The base tap's record: the recipe's, when every file of the bundle is the recorded one; else measured."""
    from edge_genarm.export.base_tap import base_tap
    from edge_genarm.export.pack_record import heldout_seqs, load_records, probe_seqs

    from edge_genarm.manifest import read_manifest, write_manifest

    m, records = read_manifest(bundle), [r for r in load_records(recipe) if r.get("base_tap")]
    (key,) = m["trunks"]
    files = {rel: r["sha256"] for rel, r in m["files"].items() if rel != m.get("nudges", {}).get("file")}
    record, why = matching(records, files, {}, Path(recipe["_dir"])) if records else (None, "no record")
    if why is None:
        m["trunks"][key]["base_tap"] = {**record["base_tap"], "recorded": True}
        write_manifest(bundle, m)
        log(f"base tap: recorded with the recipe ({'passed' if record['base_tap']['passed'] else 'REFUSED'}; files identical)")
        return m["trunks"][key]["base_tap"]
    log(why if why != "no record" else "the recipe records no base tap: measuring it")
    seqs = {n: heldout_seqs(recipe, n, bundle, a.get("training")) for n, a in m["arms"].items()}
    return base_tap(bundle, seqs=seqs, probe=probe_seqs(recipe, bundle), log=log)


def build_stages(root: Path, bundle: Path, gguf: Path, recipe: dict, stage, log=print) -> None:
    """Every stage after the base model (pack.stage_names), each skipped when already done."""
    from edge_genarm.export.lean_pack import _BASE, arm_stage, nudge_stage

    from edge_genarm.manifest import read_manifest

    for arm in recipe["arms"]:
        with stage(f"ARM '{arm}'"):
            arm_stage(root, gguf, recipe, arm, log)
    if recipe.get("nudges"):
        with stage("nudge table"):
            if "nudges" not in read_manifest(bundle):
                nudge_stage(bundle, recipe, log)
    with stage("shared trunk"):
        arms = read_manifest(bundle).get("arms", {})
        if set(arms) != set(recipe["arms"]) or any("trunk" not in a for a in arms.values()):
            share_stage(root, bundle, gguf, recipe, log)
    if recipe["share"].get("base_tap"):
        with stage("base tap"):
            if any("base_tap" not in t for t in read_manifest(bundle).get("trunks", {}).values()):
                base_tap_stage(bundle, recipe, log)
        if recipe.get("mix"):  # it runs on the base's tap (pack.stage_names)
            from edge_genarm.export.lean_mix import ensure_mix

            with stage("mix head"):
                ensure_mix(bundle, gguf, recipe, log)
    _BASE.clear()

