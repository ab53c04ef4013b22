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
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

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
# the manifest's fields: one validator (types, finite numbers, known keys)
# ---------------------------------------------------------------------------


def _read_json(path: Path, what: str):
    """A JSON file's value; unreadable, not UTF-8 or not JSON is a BundleError naming it."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:120]
        raise BundleError(
            f"{what} '{path}' is not valid JSON ({why}): restore it or re-export the bundle"
        ) from None


def _show(v) -> str:
    return (
        repr(v)
        if not isinstance(v, (dict, list))
        else f"a JSON {'object' if isinstance(v, dict) else 'list'}"
    )


def _str(v) -> bool:
    return isinstance(v, str)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _relpath(v) -> bool:
    """A path inside the bundle: relative, no '..', not empty."""
    if not isinstance(v, str) or not v or "\\" in v:
        return False
    p = PurePosixPath(v)
    return not p.is_absolute() and ".." not in p.parts


# fmt: off
_TYPES = {  # type -> (check, what a value must be)
    "str": (_str, "a string"),
    "int>=0": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "int>=1": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "int?": (lambda v: v is None or _int(v), "an integer or null"),
    "str?": (lambda v: v is None or _str(v), "a string or null"),
    "number": (_number, "a finite number"),
    "beta_r": (lambda v: v is None or (_number(v) and v > 0), "a finite number > 0, or null"),
    "path": (_relpath, "a relative path inside the bundle"),
    "path?": (lambda v: v is None or _relpath(v), "a relative path inside the bundle, or null"),
    "sha256": (lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None, "64 hex digits"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "dict": (lambda v: isinstance(v, dict), "a JSON object"),
    "dict?": (lambda v: v is None or isinstance(v, dict), "a JSON object or null"),
}
_RECORDS = {  # record -> ({field: type}, required fields, open: other keys allowed)
    "manifest": (
        {"format": "str", "format_version": "int>=1", "created_by": "str", "base": "@base", "arms": "{arm}",
         "trunks": "{trunk}", "files": "{file}", "chat_template": "str", "nudges": "@nudges",
         "placement": "{placement}", "reward_models": "{rm}"},
        ("format", "base"), False,
    ),
    "base": (
        {"file": "path", "architecture": "str", "n_vocab": "int>=0", "tokenizer_fingerprint": "sha256",
         "source": "dict", "parity": "dict"},
        ("file",), False,
    ),
    "arm": (
        {"file": "path", "tokens": "path?", "beta_r": "beta_r", "default_weight": "number", "trunk": "str",
         "trunk_layers": "int>=0", "source": "dict?", "parity": "dict?", "gate": "dict?", "training": "dict?",
         "graph": "str?", "n_layers": "int>=0", "n_params": "int>=0"},
        ("file",), False,
    ),
    "trunk": (
        {"file": "path", "lm_head": "path", "layers": "int>=0", "n_layers": "int>=0", "graph": "str?",
         "quantize": "str?", "lm_head_quantize": "str?", "heads_quantize": "str?", "embedding_quantize": "str?", "block_size": "int?",
         "accuracy_level": "int?", "base_tap": "dict?"},
        ("file", "lm_head"), False,
    ),
    "file": ({"size": "int>=0", "sha256": "sha256"}, ("size", "sha256"), False),
    "nudges": ({"file": "path"}, ("file",), True),  # the rest describes how the table was made
    "placement": ({"parallel": "bool"}, ("parallel",), True),  # and the speeds measured
    # reward models for Best-of-N / ARGS (export/rm_export.py); the rest records how it was made
    "rm": ({"kind": "str", "file": "path", "tokens": "path"}, ("file", "tokens"), True),
}
# fmt: on


_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _join(where: str, key: str) -> str:
    """A field's path for messages: a.b.c, with odd keys quoted (a message stays one line)."""
    key = key if re.fullmatch(r"[\w./-]+", key) else json.dumps(key)
    return f"{where}.{key}" if where else key


def _check_record(kind: str, rec, where: str, mpath: Path) -> None:
    def bad(field: str, want: str, got):
        raise BundleError(
            f"'{mpath}': {field} must be {want}, got {_show(got)}: fix the manifest or re-export the bundle"
        )

    fields, required, open_ = _RECORDS[kind]
    if not isinstance(rec, dict):
        bad(where, "a JSON object", rec)
    for key in required:
        if key not in rec:
            bad(_join(where, key), "present", "nothing")
    for key, value in rec.items():
        field = _join(where, key)
        spec = fields.get(key)
        if spec is None and not open_:
            raise BundleError(
                f"'{mpath}': unknown key '{field}' (known here: {', '.join(fields)}): a typo, or a "
                "bundle written by a newer edge-genarm (upgrade it)"
            )
        if spec is None:
            continue
        if spec.startswith("@"):
            _check_record(spec[1:], value, field, mpath)
        elif spec.startswith("{"):
            if not isinstance(value, dict):
                bad(field, "a JSON object", value)
            for name, item in value.items():
                if spec in ("{arm}", "{trunk}", "{rm}") and not _NAME.fullmatch(name):
                    bad(f"{field} key", "a name of letters, digits, '_', '-' and '.' (at most 64)", name)
                if spec == "{file}" and not _relpath(name):
                    bad(f"{field} key", "a relative path inside the bundle", name)
                _check_record(spec[1:-1], item, _join(field, name), mpath)
        elif not _TYPES[spec][0](value):
            bad(field, _TYPES[spec][1], value)


def validate_manifest(manifest, mpath: Path) -> dict:
    """`manifest` (parsed JSON) checked field by field; the first bad field is a BundleError that
    names the file, the field, what it must be and what it is."""
    if not isinstance(manifest, dict):
        raise BundleError(
            f"'{mpath}' is not an {FORMAT} manifest (it holds {_show(manifest)}, not a JSON object): "
            "restore it or re-export the bundle"
        )
    if manifest.get("format") != FORMAT:
        raise BundleError(
            f"'{mpath}' is not an {FORMAT} manifest (format {_show(manifest.get('format'))}): "
            "re-export the bundle"
        )
    version = manifest.get("format_version", FORMAT_VERSION)
    if _int(version) and version > FORMAT_VERSION:
        raise BundleError(
            f"'{mpath}' is format {version}, newer than this edge-genarm ({FORMAT_VERSION}): upgrade edge-genarm"
        )
    _check_record("manifest", manifest, "", mpath)
    for name, a in manifest.get("arms", {}).items():
        key = a.get("trunk")
        if key is not None and key not in manifest.get("trunks", {}):
            raise BundleError(
                f"'{mpath}': ARM '{name}' ('{a.get('file')}') is a head on trunk '{key}', which the manifest "
                "does not list: "
                "re-export the ARMs with `edge-genarm export share-trunk`"
            )
    return manifest


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
        manifest = validate_manifest(_read_json(mpath, "manifest"), mpath)
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


MAX_VOCAB = 1 << 24  # token ids past this are a corrupt file, not a vocabulary


def load_arm_tokens(path: Path | None, arm: str) -> list[str] | None:
    """tokens.json (a list of token strings) or a Hugging Face tokenizer.json beside the ONNX file;
    None when there is none. A file that is not one of those is a TokenizerMismatchError naming it."""
    if path is None or not path.is_file():
        return None

    def bad(what: str):
        return TokenizerMismatchError(
            f"ARM '{arm}': '{path}' {what}: it must be a JSON list of the ARM's token strings "
            "(or a tokenizer.json); re-export the ARM with `edge-genarm export arm`"
        )

    try:
        data = _read_json(path, f"ARM '{arm}': tokens file")
    except BundleError as e:
        raise TokenizerMismatchError(str(e).replace("re-export the bundle", "re-export the ARM")) from None
    if isinstance(data, list):
        if not data:
            raise bad("lists no tokens")
        if not all(isinstance(t, str) for t in data):
            i = next(i for i, t in enumerate(data) if not isinstance(t, str))
            raise bad(f"has {_show(data[i])} at index {i}, not a token string")
        return data
    if not isinstance(data, dict):
        raise bad(f"holds {_show(data)}")
    model = data.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    added = data.get("added_tokens", [])
    if not isinstance(vocab, dict) or not isinstance(added, list):
        raise bad("has no model.vocab object")
    pairs = list(vocab.items()) + [
        (a.get("content"), a.get("id")) if isinstance(a, dict) else (None, None) for a in added
    ]
    for tok, i in pairs:
        if not isinstance(tok, str) or not _int(i) or not 0 <= i < MAX_VOCAB:
            raise bad(f"maps {tok!r} to id {i!r} (ids are integers from 0 to {MAX_VOCAB - 1})")
    if not pairs:
        raise bad("lists no tokens")
    out = [""] * (max(i for _, i in pairs) + 1)
    for tok, i in pairs:
        out[i] = tok
    return out


def find_arm_tokens(onnx_path: Path) -> Path | None:
    for name in ("tokens.json", "tokenizer.json"):
        if (onnx_path.parent / name).is_file():
            return onnx_path.parent / name
    return None


def check_arm_tokens(
    arm: str,
    arm_tokens: list[str] | None,
    base_tokens: list[str],
    base_name: str,
    arm_vocab: int | None = None,
    tokens_path: Path | None = None,
) -> None:
    """Refuse an ARM whose token ids differ from the base's on the shared id range: both checks,
    `check_token_ids` (the files) and `check_arm_vocab` (the files against the graph)."""
    check_token_ids(arm, arm_tokens, base_tokens, base_name)
    check_arm_vocab(arm, len(arm_tokens), arm_vocab, len(base_tokens), base_name, tokens_path)


def check_token_ids(arm: str, arm_tokens: list[str] | None, base_tokens: list[str], base_name: str) -> None:
    """The ARM's token strings equal the base's on the ids both list."""
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


def check_arm_vocab(
    arm: str,
    n_tokens: int,
    arm_vocab: int | None,
    n_base: int,
    base_name: str,
    tokens_path: Path | None = None,
) -> None:
    """The ARM's token list fits the ids its graph scores (`arm_vocab`, None when the graph does
    not say). The shared range is every id both models score, min(ARM vocab, base vocab): the
    list must cover it, else ids would be used unchecked (a graph of unknown vocab must list
    every base id), and must not be longer than the graph's vocab (then they do not belong
    together)."""
    where = f"'{tokens_path}'" if tokens_path else "its tokens file"
    if arm_vocab and n_tokens > arm_vocab:
        raise TokenizerMismatchError(
            f"ARM '{arm}' lists {n_tokens} tokens in {where} but its graph scores only "
            f"{arm_vocab} ids: the graph and its tokens do not belong together; re-export the ARM with "
            "`edge-genarm export arm`"
        )
    shared = min(arm_vocab or n_base, n_base)
    if n_tokens < shared:
        raise TokenizerMismatchError(
            f"ARM '{arm}' lists {n_tokens} tokens in {where} but scores {shared} ids shared "
            f"with base '{base_name}': ids {n_tokens} to {shared - 1} cannot be checked; "
            "re-export the ARM with `edge-genarm export arm`"
        )


def check_base_tokens(bundle: Bundle, base_tokens: list[str]) -> None:
    """The base GGUF's vocabulary is the one the manifest recorded (every ARM was checked against
    that one when it was exported)."""
    want = bundle.manifest["base"].get("tokenizer_fingerprint")
    if want is not None and vocab_fingerprint(base_tokens) != want:
        raise TokenizerMismatchError(
            f"base '{bundle.base_path}' has a different vocabulary ({len(base_tokens)} tokens) from the "
            f"one its manifest recorded (tokenizer_fingerprint {want[:12]}): the file was replaced; "
            "restore it or re-export the bundle"
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


@contextmanager
def scratch_dir(root: Path, kind: str) -> Iterator[Path]:
    """A temporary folder in `root` (same filesystem, so its files rename into place), named
    .KIND-scratch-PID-*; ones left by killed runs (their process is gone) are deleted first."""
    root.mkdir(parents=True, exist_ok=True)
    clean_scratch(root)
    path = Path(tempfile.mkdtemp(dir=root, prefix=f".{kind}-scratch-{os.getpid()}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def tidy_bundle(root: Path) -> list[Path]:
    """Delete what a killed export or share-trunk left in bundle `root`: stale scratch folders,
    the temporary files of killed atomic writes, and files under arms/ and trunks/ that its
    manifest does not record (e.g. full ARM graphs a finished share-trunk had yet to delete).
    Returns what was deleted."""
    m = read_manifest(root)
    kept = {root / rel for rel in m.get("files", {})}
    gone = []
    for sub in ("arms", "trunks"):
        for p in sorted((root / sub).rglob("*"), reverse=True) if (root / sub).is_dir() else []:
            if p.is_file() and p not in kept:
                p.unlink()
                gone.append(p)
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
    for p in root.glob(".*.tmp"):  # an atomic write killed before its rename (paths.atomic_write_bytes)
        p.unlink(missing_ok=True)
        gone.append(p)
    return gone + clean_scratch(root)


def clean_scratch(root: Path) -> list[Path]:
    """Delete the scratch folders in `root` whose process is gone (a killed export's)."""
    gone = []
    for old in root.glob(".*-scratch-*") if root.is_dir() else []:
        pid = old.name.split("-scratch-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
            gone.append(old)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def add_base(
    root: str | Path, gguf_path: str | Path, name: str = "base.gguf", extra: dict | None = None
) -> dict:
    """Copy (atomically) a GGUF into the bundle and record it (with `extra`) in one manifest write."""
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
        **(extra or {}),
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
