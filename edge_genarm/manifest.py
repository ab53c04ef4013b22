"""The manifest: manifest.json's schema, its one validator, and reading and writing the file.

Every field has a type (`_RECORDS`), every value is checked before any is used, and the first
bad one is a BundleError naming the file, the field, what it must be and what it is. The
manifest is written here too (export, and `bench --record` for the measured placement), always
atomically.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path, PurePosixPath

from . import __version__
from .errors import BundleError
from .paths import atomic_write_json

MANIFEST = "manifest.json"
FORMAT = "edge-genarm-bundle"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------
# the manifest's fields: one validator (types, finite numbers, known keys)
# ---------------------------------------------------------------------------


def read_json(path: Path, what: str):
    """A JSON file's value; unreadable, not UTF-8 or not JSON is a BundleError naming it."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:120]
        raise BundleError(
            f"{what} '{path}' is not valid JSON ({why}): restore it or re-export the bundle"
        ) from None


def show(v) -> str:
    return (
        repr(v)
        if not isinstance(v, (dict, list))
        else f"a JSON {'object' if isinstance(v, dict) else 'list'}"
    )


def _str(v) -> bool:
    return isinstance(v, str)


def is_int(v) -> bool:
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
    "int>=0": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "int>=1": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "int?": (lambda v: v is None or is_int(v), "an integer or null"),
    "str?": (lambda v: v is None or _str(v), "a string or null"),
    "number": (_number, "a finite number"),
    "beta_r": (lambda v: v is None or (_number(v) and v > 0), "a finite number > 0, or null"),
    "path": (_relpath, "a relative path inside the bundle"),
    "path?": (lambda v: v is None or _relpath(v), "a relative path inside the bundle, or null"),
    "sha256": (lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None, "64 hex digits"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "dict": (lambda v: isinstance(v, dict), "a JSON object"),
    "dict?": (lambda v: v is None or isinstance(v, dict), "a JSON object or null"),
    "names": (lambda v: isinstance(v, list) and len(v) >= 2 and all(_str(x) for x in v), "a list of 2 or more names"),
}
_RECORDS = {  # record -> ({field: type}, required fields, open: other keys allowed)
    "manifest": (
        {"format": "str", "format_version": "int>=1", "created_by": "str", "base": "@base", "arms": "{arm}",
         "trunks": "{trunk}", "files": "{file}", "chat_template": "str", "nudges": "@nudges",
         "placement": "{placement}", "reward_models": "{rm}", "mix": "@mix"},
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
    # the fast mode's mix head (backends/mix.py, export/lean_mix.py); the rest records how it was made
    "mix": ({"file": "path", "trunk": "str", "objectives": "names", "first_layer": "int>=0", "tap_layer": "int>=0"},
            ("file", "trunk", "objectives", "tap_layer"), True),
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
            f"'{mpath}': {field} must be {want}, got {show(got)}: fix the manifest or re-export the bundle"
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
            f"'{mpath}' is not an {FORMAT} manifest (it holds {show(manifest)}, not a JSON object): "
            "restore it or re-export the bundle"
        )
    if manifest.get("format") != FORMAT:
        raise BundleError(
            f"'{mpath}' is not an {FORMAT} manifest (format {show(manifest.get('format'))}): "
            "re-export the bundle"
        )
    version = manifest.get("format_version", FORMAT_VERSION)
    if is_int(version) and version > FORMAT_VERSION:
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
# the file
# ---------------------------------------------------------------------------


def read_manifest(root: Path) -> dict:
    """The manifest of bundle folder `root` as stored (unvalidated: the writers' starting point),
    or an empty one when the folder has none yet."""
    p = Path(root) / MANIFEST
    if p.is_file():
        return json.loads(p.read_text())
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "arms": {}, "files": {}}


def write_manifest(root: Path, manifest: dict) -> None:
    """Write `manifest` into bundle folder `root` atomically, stamped with this version."""
    manifest["created_by"] = f"edge-genarm {__version__}"
    atomic_write_json(Path(root) / MANIFEST, manifest)
