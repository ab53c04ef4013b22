"""The bundle: a folder with the base GGUF, ARM ONNX files and manifest.json.

    bundle/
      manifest.json            what is here, hashes, tokenizer fingerprints
      base.gguf
      arms/<name>/model.onnx   (+ model.onnx_data when large)
      arms/<name>/tokens.json  the ARM tokenizer's id -> token strings

Everything is checked before the first token: files present with the recorded
size and sha256 (hashes verified once per file version, then remembered),
the GGUF readable, and each ARM's token ids equal to the base's on the shared
id range (an ARM vocab padded past the base's, 32001 vs 32000, is fine).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import BundleError, ConfigError, TokenizerMismatchError
from .gguf import read_gguf, vocab_fingerprint
from .paths import atomic_write_json, cache_dir, update_json

MANIFEST = "manifest.json"
FORMAT = "edge-genarm-bundle"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrunkEntry:
    """A trunk shared by sibling ARMs (export/split.py): its graph, the shared LM head, its id."""

    key: str
    path: Path
    lm_head: Path


@dataclass(frozen=True)
class ArmEntry:
    name: str
    path: Path  # the whole ARM graph, or its head when `trunk` is set
    tokens_path: Path | None
    beta_r: float | None = None
    default_weight: float = 1.0
    trunk: TrunkEntry | None = None


# ---------------------------------------------------------------------------
# hashing, remembered per (path, size, mtime)
# ---------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verified_hash(path: Path) -> str:
    memo_path = cache_dir() / "hashes.json"
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key not in memo:
        digest = sha256_file(path)  # not under the lock: hashing a large file takes seconds
        try:  # locked read-modify-write: another process's new entries survive ours
            update_json(memo_path, lambda m: m.__setitem__(key, digest))
        except OSError:
            pass
        return digest
    return memo[key]


def file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


# ---------------------------------------------------------------------------
# reading a bundle
# ---------------------------------------------------------------------------


class Bundle:
    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = root, manifest
        self.base_path = root / manifest["base"]["file"]
        self.arms: dict[str, ArmEntry] = {}
        trunks = manifest.get("trunks", {})
        for name, a in manifest.get("arms", {}).items():
            tok, key = a.get("tokens"), a.get("trunk")
            trunk = None
            if key is not None:
                t = trunks.get(key)
                if not isinstance(t, dict) or "file" not in t or "lm_head" not in t:
                    raise BundleError(
                        f"ARM '{name}' ('{a['file']}') is a head on trunk '{key}', which the manifest "
                        f"of '{root}' does not list: re-export it with `edge-genarm export share-trunk`"
                    )
                trunk = TrunkEntry(key, root / t["file"], root / t["lm_head"])
            self.arms[name] = ArmEntry(
                name,
                root / a["file"],
                root / tok if tok else None,
                a.get("beta_r"),
                float(a.get("default_weight", 1.0)),
                trunk,
            )

    @property
    def chat_template(self) -> str | None:
        return self.manifest.get("chat_template")

    @classmethod
    def open(cls, root: str | Path, verify: bool = True) -> Bundle:
        root = Path(root)
        if root.is_file() and root.suffix == ".gguf":
            return cls(root.parent, {"base": {"file": root.name}, "arms": {}})
        mpath = root / MANIFEST
        if not root.is_dir():
            raise BundleError(
                f"bundle folder '{root}' does not exist: pass --weights BUNDLE_DIR "
                "(made by `edge-genarm export`) or a .gguf file"
            )
        if not mpath.is_file():
            raise BundleError(
                f"'{root}' has no {MANIFEST}: it is not an edge-genarm bundle; "
                "create one with `edge-genarm export base`, or pass a .gguf file"
            )
        try:
            manifest = json.loads(mpath.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise BundleError(
                f"'{mpath}' is not valid JSON ({e}): restore it or re-export the bundle"
            ) from None
        if manifest.get("format") != FORMAT or "base" not in manifest:
            raise BundleError(f"'{mpath}' is not an {FORMAT} manifest: re-export the bundle")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise BundleError(
                f"'{mpath}' is format {manifest['format_version']}, newer than this "
                f"edge-genarm ({FORMAT_VERSION}): upgrade edge-genarm"
            )
        bundle = cls(root, manifest)
        bundle.check_files(verify)
        return bundle

    def check_files(self, verify: bool) -> None:
        """Every recorded file exists with its recorded size (and sha256 when verify)."""
        for rel, rec in self.manifest.get("files", {}).items():
            p = self.root / rel
            if not p.is_file():
                raise BundleError(
                    f"bundle '{self.root}' is missing '{rel}': copy the whole bundle "
                    "folder again or re-export it"
                )
            if p.stat().st_size != rec["size"]:
                raise BundleError(
                    f"'{p}' has {p.stat().st_size} bytes, the manifest says "
                    f"{rec['size']}: the file is truncated or was replaced; re-export it"
                )
            if verify and _verified_hash(p) != rec["sha256"]:
                raise BundleError(
                    f"'{p}' does not match its sha256 in the manifest: the file is "
                    "corrupt or was replaced; re-export it"
                )


def load_arm_tokens(path: Path | None, arm: str) -> list[str] | None:
    """tokens.json (a list) or a Hugging Face tokenizer.json beside the ONNX file."""
    if path is None or not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, list):
        return data
    vocab = dict(data.get("model", {}).get("vocab", {}))
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    if not vocab:
        raise BundleError(f"ARM '{arm}': cannot read a vocabulary from '{path}'")
    out = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        out[i] = tok
    return out


def find_arm_tokens(onnx_path: Path) -> Path | None:
    for name in ("tokens.json", "tokenizer.json"):
        if (onnx_path.parent / name).is_file():
            return onnx_path.parent / name
    return None


def check_arm_tokens(arm: str, arm_tokens: list[str] | None, base_tokens: list[str], base_name: str) -> None:
    """Refuse an ARM whose token ids differ from the base's on the shared id range."""
    if arm_tokens is None:
        raise TokenizerMismatchError(
            f"ARM '{arm}' has no tokens.json or tokenizer.json beside it, so its token ids cannot "
            "be checked against the base: export it with `edge-genarm export arm`"
        )
    n = min(len(arm_tokens), len(base_tokens))
    if vocab_fingerprint(arm_tokens, n) == vocab_fingerprint(base_tokens, n):
        return
    i = next(i for i in range(n) if arm_tokens[i] != base_tokens[i])
    raise TokenizerMismatchError(
        f"ARM '{arm}' uses a different tokenizer from base '{base_name}': token id {i} is "
        f"{arm_tokens[i]!r} in the ARM but {base_tokens[i]!r} in the base. An ARM must share the "
        "base's token ids: train or export it from a model with the base's tokenizer"
    )


# ---------------------------------------------------------------------------
# run-time ARM selection: "name=weight" or "path/to/model.onnx=weight"
# ---------------------------------------------------------------------------


def parse_arm_spec(spec: str) -> tuple[str, float | None]:
    name, sep, w = spec.rpartition("=") if "=" in spec else (spec, "", "")
    name = name.strip()
    if not name:
        raise ConfigError(f"bad --arm {spec!r}: use NAME=WEIGHT, e.g. --arm positive=1.0")
    if not sep:
        return name, None
    try:
        weight = float(w)
    except ValueError:
        raise ConfigError(
            f"ARM weight for '{name}' must be a number, got {w!r}: e.g. --arm {name}=0.5"
        ) from None
    if weight != weight or weight in (float("inf"), float("-inf")):
        raise ConfigError(f"ARM weight for '{name}' must be finite, got {w!r}")
    return name, weight


def resolve_arm(bundle: Bundle, name: str) -> ArmEntry:
    if name in bundle.arms:
        return bundle.arms[name]
    p = Path(name)
    if p.suffix == ".onnx":
        if not p.is_file():
            raise ConfigError(f"ARM file '{p}' does not exist")
        return ArmEntry(p.stem if p.stem != "model" else p.parent.name, p, find_arm_tokens(p))
    have = ", ".join(bundle.arms) or "none"
    raise ConfigError(f"unknown ARM '{name}': this bundle has {have}; or give a path to an .onnx file")


# ---------------------------------------------------------------------------
# writing a bundle (used by export and by the test fixtures)
# ---------------------------------------------------------------------------


def read_manifest(root: Path) -> dict:
    p = root / MANIFEST
    if p.is_file():
        return json.loads(p.read_text())
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "arms": {}, "files": {}}


def write_manifest(root: Path, manifest: dict) -> None:
    manifest["created_by"] = f"edge-genarm {__version__}"
    atomic_write_json(root / MANIFEST, manifest)


def add_file(root: Path, manifest: dict, rel: str) -> None:
    """Record a file already written into the bundle (size + sha256)."""
    manifest.setdefault("files", {})[rel] = file_record(Path(root) / rel)


def add_base(root: str | Path, gguf_path: str | Path, name: str = "base.gguf") -> dict:
    """Copy (atomically) a GGUF into the bundle and record it in the manifest."""
    root, src = Path(root), Path(gguf_path)
    info = read_gguf(src)
    root.mkdir(parents=True, exist_ok=True)
    dst = root / name
    if src.resolve() != dst.resolve():
        tmp = dst.with_name(dst.name + ".partial")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
    m = read_manifest(root)
    m["base"] = {
        "file": name,
        "architecture": info.architecture,
        "n_vocab": len(info.tokens),
        "tokenizer_fingerprint": vocab_fingerprint(info.tokens),
    }
    m.setdefault("files", {})[name] = file_record(dst)
    write_manifest(root, m)
    return m


def add_arm(
    root: str | Path,
    onnx_dir: str | Path,
    name: str,
    beta_r: float | None = None,
    weight: float = 1.0,
    extra: dict | None = None,
) -> dict:
    """Copy an exported ARM folder (model.onnx [+ data], tokens.json) into the bundle."""
    root, src = Path(root), Path(onnx_dir)
    m = read_manifest(root)
    if "base" not in m:
        raise BundleError(f"bundle '{root}' has no base model yet: run `edge-genarm export base` first")
    base_tokens = read_gguf(root / m["base"]["file"]).tokens
    check_arm_tokens(
        name, load_arm_tokens(find_arm_tokens(src / "model.onnx"), name), base_tokens, m["base"]["file"]
    )
    rel_dir = Path("arms") / name
    dst = root / rel_dir
    tmp = root / "arms" / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = [p for p in src.iterdir() if p.name.startswith("model.onnx") or p.name == "tokens.json"]
    for p in files:
        shutil.copyfile(p, tmp / p.name)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    recs = m.setdefault("files", {})
    for k in [k for k in recs if k.startswith(f"{rel_dir}/")]:
        del recs[k]
    for p in files:
        recs[f"{rel_dir}/{p.name}"] = file_record(dst / p.name)
    m.setdefault("arms", {})[name] = {
        "file": f"{rel_dir}/model.onnx",
        "tokens": f"{rel_dir}/tokens.json",
        "beta_r": beta_r,
        "default_weight": weight,
        **(extra or {}),
    }
    write_manifest(root, m)
    return m
