"""The bundle: a folder with the base GGUF, ARM ONNX files and manifest.json, read and checked.

    bundle/
      manifest.json            what is here, hashes, tokenizer fingerprints (manifest.py)
      base.gguf
      arms/<name>/model.onnx   (+ model.onnx_data when large)
      arms/<name>/tokens.json  the ARM tokenizer's id -> token strings (tokens.py)

Opening a bundle checks everything that needs no model: the manifest field by field, files
present with the recorded size and sha256 (hashes verified once per file version, then
remembered). Run-time ARM choices ("name=weight" or a path to an .onnx file) resolve here.
The writers (export) are in export/bundle_write.py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError, ConfigError
from .manifest import MANIFEST, read_json, validate_manifest
from .paths import cache_dir, update_json
from .tokens import find_arm_tokens


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


# ---------------------------------------------------------------------------
# reading a bundle
# ---------------------------------------------------------------------------


class Bundle:
    """A bundle folder and its manifest (validated by `validate_manifest` before this is built)."""

    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = root, manifest
        self.base_path = root / manifest["base"]["file"]
        self.arms: dict[str, ArmEntry] = {}
        trunks = manifest.get("trunks", {})
        for name, a in manifest.get("arms", {}).items():
            tok, key = a.get("tokens"), a.get("trunk")
            t = trunks[key] if key is not None else None
            self.arms[name] = ArmEntry(
                name,
                root / a["file"],
                root / tok if tok else None,
                a.get("beta_r"),
                float(a.get("default_weight", 1.0)),
                TrunkEntry(key, root / t["file"], root / t["lm_head"]) if t else None,
            )

    @property
    def chat_template(self) -> str | None:
        return self.manifest.get("chat_template")

    @classmethod
    def open(cls, root: str | Path, verify: bool = True) -> Bundle:
        root = Path(root)
        if root.is_file():
            with open(root, "rb") as f:
                if root.suffix != ".gguf" and f.read(4) != b"GGUF":
                    raise BundleError(
                        f"'{root}' is a file but not a .gguf model: pass a bundle folder (made by "
                        "`edge-genarm export`) or a .gguf file"
                    )
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
        manifest = validate_manifest(read_json(mpath, "manifest"), mpath)
        bundle = cls(root, manifest)
        bundle.check_files(verify)
        graphs = [("base.file", bundle.base_path)] + [
            (f"arms.{n}.file", a.path) for n, a in bundle.arms.items()
        ]
        for what, p in graphs:
            if not p.is_file():
                raise BundleError(
                    f"bundle '{root}' has no '{p.relative_to(root)}' (its manifest's {what}): copy the whole "
                    "bundle folder again or re-export it"
                )
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
            have = ", ".join(bundle.arms) or "none"
            raise ConfigError(
                f"ARM file '{p}' does not exist: check the path, or name one of this bundle's ARMs ({have})"
            )
        return ArmEntry(p.stem if p.stem != "model" else p.parent.name, p, find_arm_tokens(p))
    have = ", ".join(bundle.arms) or "none"
    raise ConfigError(f"unknown ARM '{name}': this bundle has {have}; or give a path to an .onnx file")
