"""Models from an Ollama store, read in place: `ollama:NAME[:TAG]` -> the model's GGUF blob.

Ollama keeps a model as a manifest, `manifests/HOST/NAMESPACE/NAME/TAG` (JSON whose `layers[]`
name each part by `mediaType` and `digest`), and content-addressed blobs, `blobs/sha256-HEX`.
The GGUF is the layer of media type `application/vnd.ollama.image.model`. The store is
`$OLLAMA_MODELS` or `~/.ollama/models`; it is only read here: nothing is copied or written.
NAME is `name`, `namespace/name` or `host/namespace/name`; the host defaults to
registry.ollama.ai, the namespace to `library`, the tag to `latest`, as in Ollama.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import ModelFileError

PREFIX = "ollama:"
HOST, NAMESPACE, TAG = "registry.ollama.ai", "library", "latest"
MODEL_MEDIA = "application/vnd.ollama.image.model"
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(:[0-9]+)?$")
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")


class OllamaError(ModelFileError):
    """An Ollama model that cannot be found or read from the store."""


def store_root() -> Path:
    """$OLLAMA_MODELS, else ~/.ollama/models."""
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


def parse_ref(ref: str) -> tuple[str, str, str, str]:
    """(host, namespace, name, tag) of `[host/][namespace/]name[:tag]`; OllamaError if malformed."""
    ref = ref[len(PREFIX) :] if ref.startswith(PREFIX) else ref
    parts = ref.strip().split("/")
    last = parts[-1]
    name, _, tag = last.partition(":")
    tag = tag or TAG
    if len(parts) > 3 or not all(parts[:-1]) or not name:
        raise OllamaError(
            f"'{PREFIX}{ref}' is not an Ollama model name: write NAME, NAME:TAG, NS/NAME or HOST/NS/NAME"
        )
    host = parts[0] if len(parts) == 3 else HOST
    ns = parts[-2] if len(parts) >= 2 else NAMESPACE
    bad = [p for p in (ns, name, tag) if not _PART.match(p)] + ([] if _HOST.match(host) else [host])
    if bad:
        raise OllamaError(
            f"'{PREFIX}{ref}' is not an Ollama model name ({bad[0]!r}: letters, digits, '.', '_' and '-' only)"
        )
    return host, ns, name, tag


def display_name(host: str, ns: str, name: str, tag: str) -> str:
    """The short form `ollama list` shows: the default host and namespace left out."""
    if host == HOST:
        return f"{name}:{tag}" if ns == NAMESPACE else f"{ns}/{name}:{tag}"
    return f"{host}/{ns}/{name}:{tag}"


def list_models(root: Path | None = None) -> list[str]:
    """Every model in the store (sorted display names); [] when there is none."""
    base = (root or store_root()) / "manifests"
    if not base.is_dir():
        return []
    found = []
    for p in base.glob("*/*/*/*"):
        if p.is_file():
            found.append(display_name(*p.relative_to(base).parts))
    return sorted(found)


def _missing(ref: str, root: Path) -> OllamaError:
    models = list_models(root)
    where = f"the Ollama store at '{root}'"
    if not (root / "manifests").is_dir():
        return OllamaError(
            f"no Ollama store at '{root}' (no manifests folder) for '{PREFIX}{ref}': set OLLAMA_MODELS "
            "to the store's folder, or `ollama pull` the model"
        )
    listing = ", ".join(models) if models else "none"
    return OllamaError(f"no model '{ref}' in {where}; models there: {listing}")


def read_manifest(ref: str, root: Path | None = None) -> tuple[Path, dict]:
    """(manifest path, its JSON) for `ref`; OllamaError naming what is there when it is absent."""
    root = root or store_root()
    host, ns, name, tag = parse_ref(ref)
    shown = display_name(host, ns, name, tag)
    path = root / "manifests" / host / ns / name / tag
    if not path.is_file():
        raise _missing(shown, root)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise OllamaError(
            f"Ollama manifest '{path}' is not readable JSON ({e}): `ollama pull {shown}` again"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
        raise OllamaError(f"Ollama manifest '{path}' has no 'layers' list: `ollama pull {shown}` again")
    return path, manifest


def resolve(ref: str, root: Path | None = None) -> Path:
    """The GGUF blob of Ollama model `ref` (`[ollama:]NAME[:TAG]`), checked to be a GGUF, in place."""
    root = root or store_root()
    path, manifest = read_manifest(ref, root)
    shown = display_name(*parse_ref(ref))
    layers = [x for x in manifest["layers"] if isinstance(x, dict)]
    model = [x for x in layers if x.get("mediaType") == MODEL_MEDIA]
    if not model:
        kinds = ", ".join(str(x.get("mediaType")) for x in layers) or "none"
        raise OllamaError(
            f"Ollama manifest '{path}' has no model layer ({MODEL_MEDIA}; its layers: {kinds}): "
            f"'{shown}' holds no GGUF weights to load"
        )
    m = _DIGEST.match(str(model[0].get("digest", "")))
    if not m:
        raise OllamaError(
            f"Ollama manifest '{path}' has a model layer without a sha256 digest "
            f"({model[0].get('digest')!r}): `ollama pull {shown}` again"
        )
    blob = root / "blobs" / f"sha256-{m.group(1)}"
    if not blob.is_file():
        raise OllamaError(
            f"the model layer of '{shown}' (blob '{blob}') is missing from the Ollama store: "
            f"`ollama pull {shown}` again"
        )
    with open(blob, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise OllamaError(
            f"the model layer of '{shown}' (blob '{blob}') is not a GGUF file (it starts {magic!r}): "
            "edge-genarm loads GGUF models only"
        )
    return blob
