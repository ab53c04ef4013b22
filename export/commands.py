"""`edge-genarm export base|arm` and `bundle inspect`: sources -> a checked bundle.

Each export: check the source, convert into a temporary name, check parity
against the source, then rename into place and record it in the manifest. A run
killed at any point leaves the previous manifest (or none) untouched, so the
bundle never loads a half-written model; a re-run of a finished export skips.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from edge_genarm.export.bundle_write import add_arm, add_base, clean_scratch, scratch_dir
from edge_genarm.export.parity import format_parity, run_parity
from edge_genarm.export.sources import is_gguf, load_source, save_hf

from edge_genarm.errors import BundleError
from edge_genarm.manifest import MANIFEST, read_manifest


def _stages(names: list[str], desc: str):
    from tqdm import tqdm

    return tqdm(
        names,
        desc=desc,
        unit="stage",
        file=sys.stderr,
        leave=True,
        bar_format="{desc}: {n_fmt}/{total_fmt} {bar:20} {postfix}",
    )


def source_fingerprint(source: Path, layers: int | None = None) -> str:
    """Identifies a source version: names, sizes and mtimes of its files (+ the cut)."""
    h = hashlib.sha256(f"{source.resolve()}|{layers}".encode())
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    for p in files:
        st = p.stat()
        h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _left_by_killed_base(name: str) -> bool:
    """What a killed `export base` leaves before its manifest exists: the GGUF (or its partial
    copy), a scratch folder, or the manifest's own temporary file (killed inside the rename)."""
    return (
        name in ("base.gguf", "base.gguf.partial")
        or "-scratch-" in name
        or (name.startswith(f".{MANIFEST}.") and name.endswith(".tmp"))
    )


def _check_output(out: Path, key: str, fp: str, force: bool, what: str) -> bool:
    """True when `out` already holds this exact export (skip); refuse a different one."""
    if not (out / MANIFEST).is_file():
        if out.exists() and key == "base" and any(not _left_by_killed_base(p.name) for p in out.iterdir()):
            raise BundleError(
                f"'{out}' exists and is not an edge-genarm bundle: choose an empty or new folder for -o"
            )
        return False
    m = read_manifest(out)
    entry = m.get("base") if key == "base" else m.get("arms", {}).get(key)
    if not entry:
        return False
    same = entry.get("source", {}).get("fingerprint") == fp and entry.get("parity", {}).get("passed", True)
    if same and not force:
        print(f"{what} is already exported from this source: skipping (--force to redo)", file=sys.stderr)
        return True
    if not same and not force and key == "base":
        raise BundleError(
            f"'{out}' already holds a different bundle (base from "
            f"{entry.get('source', {}).get('path', '?')}): choose another -o, or --force "
            "to replace its base"
        )
    return False


def export_base(source: str | Path, out: str | Path, quant: str = "f16", force: bool = False) -> dict:
    from edge_genarm.export.converter import convert_hf_to_gguf

    source, out = Path(source), Path(out)
    fp = source_fingerprint(source)
    clean_scratch(out.parent)  # what a killed run left
    if _check_output(out, "base", fp, force, "base"):
        return read_manifest(out)
    if is_gguf(source):  # adopt as is (an Ollama blob has no .gguf suffix): no source to compare against
        src = {"path": str(source.resolve()), "fingerprint": fp, "kind": "gguf"}
        return add_base(out, source, extra={"source": src, "parity": {"type": "adopted", "passed": True}})
    stages = _stages(["load", "convert", "parity", "write"], "export base")
    model, tok = load_source(source)
    stages.update()
    with scratch_dir(out.parent, "export") as tmp:
        gguf = convert_hf_to_gguf(source, Path(tmp) / "base.gguf", quant)
        stages.update()
        from edge_genarm.backends.llama_base import LlamaBase

        parity = run_parity(model, tok, LlamaBase(gguf, n_ctx=512), quant)
        stages.set_postfix_str(f"KL {parity['mean_kl']:.1e}")
        stages.update()
        print(format_parity("base", parity), file=sys.stderr)
        if not parity["passed"]:
            raise BundleError(
                f"the GGUF of '{source}' failed parity ({format_parity('base', parity)}): "
                "not written; try --quant f32 or report the model"
            )
        src = {"path": str(source.resolve()), "fingerprint": fp, "kind": "hf", "type": quant}
        m = add_base(out, gguf, extra={"source": src, "parity": parity})  # one manifest write
    stages.update()
    stages.close()
    return m


def set_chat_template(bundle: str | Path, template: str | None) -> dict:
    """The bundle's chat template (manifest `chat_template`, over the GGUF's own); None removes it.
    Checked first: a template that does not render a user message is refused."""
    from edge_genarm.chat import check_template
    from edge_genarm.manifest import read_manifest, write_manifest

    m = read_manifest(Path(bundle))
    if template is None:
        m.pop("chat_template", None)
    else:
        check_template(template, "the chat template given")
        m["chat_template"] = template
    write_manifest(Path(bundle), m)
    return m


def export_arm(
    source: str | Path,
    out: str | Path,
    name: str,
    beta_r: float | None,
    weight: float = 1.0,
    quantize: str | None = None,
    layers: int | None = None,
    force: bool = False,
    block_size: int = 32,
    accuracy_level: int = 4,
    pairs=None,
) -> dict:
    """Export SOURCE as ARM `name`; with `quantize` (int4/int8) the weight-quantized graph is
    gated against the fp32 one on `pairs` (a share.PairSpec; held-out preference accuracy,
    KL, top-1) and refused when it loses more than the gate allows (gate.within_gate)."""
    from edge_genarm.export.onnx_export import export_arm_onnx

    from edge_genarm.backends.onnx_arm import OnnxARM

    if quantize:
        from edge_genarm.export.quantize import check_options

        check_options(quantize, block_size, accuracy_level)

    source, out = Path(source), Path(out)
    if not (out / MANIFEST).is_file():
        raise BundleError(f"'{out}' has no bundle yet: run `edge-genarm export base SOURCE -o {out}` first")
    fp = source_fingerprint(source, layers)
    clean_scratch(out)  # what a killed run left
    if _check_output(out, name, fp, force, f"ARM '{name}'"):
        return read_manifest(out)
    stages = _stages(["load", "onnx", "parity", "write"], f"export arm {name}")
    model, tok = load_source(source, layers)
    _check_tokenizer(out, name, tok)  # before the slow part
    stages.update()
    with scratch_dir(out, "export") as tmp:
        hf = save_hf(model, tok, Path(tmp) / "hf")
        onnx_dir = Path(tmp) / "onnx"
        export_arm_onnx(hf, onnx_dir)
        from edge_genarm.export.compact import compact_file

        form = compact_file(onnx_dir / "model.onnx")  # fused ops: same math, fewer nodes (parity checks it)
        kind, gated = "f32", None
        if quantize:
            gated = _quantize_gated(
                out, name, onnx_dir, quantize, block_size, accuracy_level, pairs, _training_record(source)
            )
            kind = quantize
        stages.update()
        parity = run_parity(model, tok, OnnxARM(onnx_dir / "model.onnx", name, cache=False), kind)
        stages.set_postfix_str(f"KL {parity['mean_kl']:.1e}")
        stages.update()
        print(format_parity(f"ARM '{name}'", parity), file=sys.stderr)
        if not parity["passed"]:
            raise BundleError(f"the ONNX export of '{source}' failed parity: not added to the bundle")
        extra = {
            "source": {"path": str(source.resolve()), "fingerprint": fp, "layers": layers},
            "parity": parity,
            **({"gate": gated} if gated else {}),
            "graph": form,
            "n_layers": model.config.num_hidden_layers,
            "n_params": int(sum(p.numel() for p in model.parameters())),
        }
        m = add_arm(out, onnx_dir, name, beta_r=beta_r, weight=weight, extra=extra)
    stages.update()
    stages.close()
    return m


def _training_record(source: Path) -> dict | None:
    """The train-arm record in an ARM source folder, when it has one."""
    import json

    from edge_genarm.export.train_arm import ARM_INFO

    p = source / ARM_INFO if source.is_dir() else None
    return json.loads(p.read_text()) if p is not None and p.is_file() else None


def _check_tokenizer(out: Path, name: str, tok) -> None:
    from edge_genarm.export.onnx_export import tokens_from_hf_tokenizer

    from edge_genarm.gguf import read_gguf
    from edge_genarm.tokens import check_arm_tokens

    base = read_manifest(out)["base"]["file"]
    check_arm_tokens(name, tokens_from_hf_tokenizer(tok), read_gguf(out / base).tokens, base)


def _quantize_gated(
    out: Path, name: str, onnx_dir: Path, kind, block_size, accuracy_level, pairs, training=None
) -> dict:
    """Quantize onnx_dir/model.onnx in place, after checking it against the fp32 graph;
    `training`: the source's train-arm record (a relative ARM is gated relative to its init)."""
    import onnx
    from edge_genarm.export.gate import format_gate, gate, heldout_pairs
    from edge_genarm.export.onnx_io import gate_then_swap
    from edge_genarm.export.quantize import quantize_model
    from edge_genarm.export.share import probe_sequences

    from edge_genarm.backends.onnx_arm import OnnxARM

    def judge(fp32: Path, quantized: Path) -> dict:
        seqs = (
            heldout_pairs(out, pairs.data, pairs.max_len, pairs.eval_frac, pairs.seed, training)
            if pairs
            else probe_sequences(out)
        )
        ref, got = OnnxARM(fp32, name, threads=2, cache=False), OnnxARM(quantized, name, threads=2, cache=False)
        g = gate(ref.sequence_logits, got.sequence_logits, seqs)
        g["type"], g["block_size"], g["accuracy_level"] = kind, block_size, accuracy_level
        if not pairs:
            g.update(accuracy_fp32=None, accuracy_quantized=None, accuracy_drop=None, pairs=0, passed=True)
            print(f"gate ARM '{name}': KL {g['mean_kl']:.3e}, top-1 {g['top1_agreement']:.3f} against fp32 "
                  "(no --pairs: preference accuracy not measured)", file=sys.stderr)  # fmt: skip
        else:
            print(format_gate(name, g), file=sys.stderr)
            if not g["passed"]:
                raise BundleError(f"{format_gate(name, g)}: ARM '{name}' not added, the bundle is unchanged")
        return g

    src = onnx_dir / "model.onnx"
    q = quantize_model(onnx.load(str(src)), kind, block_size, accuracy_level, f"ARM '{name}'")
    return gate_then_swap(onnx_dir, q, judge)


def inspect_bundle(path: str | Path) -> str:
    from edge_genarm.bundle import Bundle
    from edge_genarm.gguf import read_gguf

    b = Bundle.open(path, verify=True)
    info = read_gguf(b.base_path)
    m = b.manifest
    lines = [
        f"bundle {b.root}  ({m.get('created_by', '?')}; all file hashes verified)",
        f"base   {m['base']['file']}: {info.architecture}, {info.get('general.name', '?')}, "
        f"{info.arch_get('block_count')} layers, vocab {len(info.tokens)}, context "
        f"{info.arch_get('context_length')}, {_size(b.base_path)}",
    ]
    lines.append(
        f"       chat template: {'yes' if info.get('tokenizer.chat_template') else 'no'}, "
        f"bos {info.get('tokenizer.ggml.bos_token_id')}, eos {info.get('tokenizer.ggml.eos_token_id')}, "
        f"add_bos {info.get('tokenizer.ggml.add_bos_token', False)}"
    )
    lines.append(f"       parity: {_parity(m['base'].get('parity'))}")
    for key, t in m.get("trunks", {}).items():
        lines.append(
            f"trunk  {key}: {t['file']} {_size(b.root / t['file'])} (layers 0-{t['layers'] - 1} of "
            f"{t['n_layers']}), LM head {_size(b.root / t['lm_head'])}; {t.get('graph')} graphs, "
            f"{t.get('quantize') or 'fp32'}"
        )
        tap = t.get("base_tap")
        if isinstance(tap, dict):
            lines.append(
                f"       base tap: heads {'run' if tap.get('passed') else 'may NOT run'} on the base's "
                f"{tap.get('node')} (hidden cosine {tap.get('hidden_cos_mean', float('nan')):.4f}); "
                + ", ".join(f"{n} accuracy {g.get('accuracy_fp32', 0):.3f} fp32 -> {g.get('accuracy_base_tap', 0):.3f}"
                            for n, g in (tap.get("gates") or {}).items() if g.get("pairs"))
            )  # fmt: skip
    for name, a in m.get("arms", {}).items():
        arm = b.arms[name]
        on = f", head on trunk {a['trunk']}" if a.get("trunk") else ""
        lines.append(
            f"arm    {name}: {a['file']} {_size(arm.path)}, beta_r {a.get('beta_r')}, default "
            f"weight {a.get('default_weight')}, layers {a.get('n_layers', '?')}{on}"
        )
        lines.append(f"       parity: {_parity(a.get('parity'))}")
        if a.get("gate"):
            g = a["gate"]
            acc = (
                f"held-out accuracy {g['accuracy_fp32']:.3f} -> {g['accuracy_quantized']:.3f} on {g['pairs']} pairs, "
                if g.get("pairs")
                else ""
            )
            lines.append(
                f"       gate ({g.get('type')}): {acc}KL {g['mean_kl']:.2e}, top-1 {g['top1_agreement']:.3f}: "
                f"{'passed' if g['passed'] else 'REFUSED'}"
            )
    for name, r in m.get("reward_models", {}).items():
        acc = (r.get("training") or {}).get("heldout_accuracy")
        lines.append(
            f"rm     {name}: {r['file']} {_size(b.root / r['file'])}, {r.get('quantize') or 'fp32'}, layers "
            f"{r.get('n_layers', '?')}, held-out accuracy {'n/a' if acc is None else f'{acc:.3f}'} (reward model)"
        )
    lines.append("files")
    for rel, rec in m.get("files", {}).items():
        lines.append(f"       {rel}  {rec['size']:,} bytes  sha256 {rec['sha256'][:16]}")
    return "\n".join(lines)


def _size(p: Path) -> str:
    n = sum(q.stat().st_size for q in p.parent.glob(p.name + "*")) if p.exists() else 0
    return f"{n / 1e6:.1f} MB"


def _parity(p: dict | None) -> str:
    if not p:
        return "not recorded"
    if p.get("type") == "adopted":
        return "adopted as is (no source to compare)"
    return (
        f"top-1 {p['top1_agreement']:.3f}, max |dlogit| {p['max_abs_logit_diff']:.2e}, "
        f"KL {p['mean_kl']:.2e} ({p['type']}): {'passed' if p['passed'] else 'FAILED'}"
    )
