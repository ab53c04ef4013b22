"""A small GGUF reader: header, metadata and tensor table, in pure Python.

llama.cpp aborts the whole process on some malformed files, so every GGUF is
read and checked here first (magic, version, bounds, and that the file is long
enough to hold every tensor) before llama.cpp ever opens it.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelFileError

GGUF_MAGIC = b"GGUF"
_SCALARS = {  # type id -> struct format
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
# ggml type id -> (block size, bytes per block); enough to size every tensor
_GGML_SIZES = {
    0: (1, 4),
    1: (1, 2),
    2: (32, 18),
    3: (32, 20),
    6: (32, 22),
    7: (32, 24),
    8: (32, 34),
    9: (32, 36),
    10: (256, 84),
    11: (256, 110),
    12: (256, 144),
    13: (256, 176),
    14: (256, 210),
    15: (256, 292),
    16: (256, 66),
    17: (256, 74),
    18: (256, 98),
    19: (256, 50),
    20: (32, 18),
    21: (256, 110),
    22: (256, 82),
    23: (256, 136),
    24: (1, 1),
    25: (1, 2),
    26: (1, 4),
    27: (1, 8),
    28: (1, 8),
    29: (256, 56),
    30: (1, 2),
    34: (256, 54),
    35: (256, 66),
    39: (32, 17),
}


@dataclass
class GGUFInfo:
    path: Path
    version: int
    metadata: dict = field(repr=False)
    n_tensors: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    @property
    def tokens(self) -> list[str]:
        return self.metadata.get("tokenizer.ggml.tokens", [])

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def arch_get(self, key: str, default=None):
        return self.metadata.get(f"{self.architecture}.{key}", default)


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def corrupt(self, what: str) -> ModelFileError:
        return ModelFileError(
            f"GGUF file '{self.path}' {what}: the file is corrupt; re-download or re-export it"
        )

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data) or self.pos > len(self.data):
            raise ModelFileError(
                f"GGUF file '{self.path}' is truncated or corrupt (needs {n} bytes at offset "
                f"{self.pos}, file has {len(self.data)}): re-download or re-export it"
            )
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def scalar(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.scalar("Q")
        if n > 1 << 24:
            raise self.corrupt(f"has a {n}-byte string at offset {self.pos - 8}")
        return self.take(n).decode("utf-8", errors="replace")

    def strings(self, n: int) -> list[str]:
        """n strings in one tight loop: vocabularies hold ~10^5 of them."""
        data, pos, end = self.data, self.pos, len(self.data)
        unpack, out = struct.unpack_from, []
        for _ in range(n):
            if pos + 8 > end:
                break
            (length,) = unpack("<Q", data, pos)
            pos += 8
            out.append(data[pos : pos + length].decode("utf-8", errors="replace"))
            pos += length
        if pos > end or len(out) < n:
            raise self.corrupt(f"has a list of {n} strings that runs past the end of the file ({end} bytes)")
        self.pos = pos
        return out

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, n = self.scalar("I"), self.scalar("Q")
            if n > 1 << 26:
                raise self.corrupt(f"has an array of {n} items at offset {self.pos - 8}")
            if itype in _SCALARS:
                fmt = _SCALARS[itype]
                raw = self.take(struct.calcsize("<" + fmt) * n)
                return list(struct.unpack(f"<{n}{fmt}", raw))
            if itype == _STRING:
                return self.strings(n)
            return [self.value(itype) for _ in range(n)]
        raise ModelFileError(
            f"GGUF file '{self.path}' has unknown value type {vtype} at offset {self.pos - 4}: the file is "
            "corrupt or newer than this edge-genarm; re-download it or upgrade"
        )


def read_gguf(path: str | Path) -> GGUFInfo:
    """Read and validate a GGUF file's header, metadata and tensor table."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"GGUF file '{path}' does not exist: check the path or re-export the bundle")
    size = path.stat().st_size
    if size < 24:
        raise ModelFileError(f"'{path}' is too small to be a GGUF file ({size} bytes): pass a .gguf model")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as head:
        return _parse(head, path, size)


def _parse(head, path: Path, size: int) -> GGUFInfo:
    r = _Reader(head, path)
    if head[:4] != GGUF_MAGIC:
        raise ModelFileError(f"'{path}' is not a GGUF file (bad magic): pass a .gguf model")
    r.pos = 4
    version = r.scalar("I")
    if version not in (2, 3):
        raise ModelFileError(
            f"GGUF file '{path}' has version {version}; supported: 2, 3: re-download it, or convert it "
            "with a current llama.cpp"
        )
    n_tensors, n_kv = r.scalar("Q"), r.scalar("Q")
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.scalar("I"))
    end = 0
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.scalar("I")
        if n_dims > 4:  # GGML_MAX_DIMS
            raise r.corrupt(f"has tensor '{name}' with {n_dims} dimensions (at most 4)")
        dims = [r.scalar("Q") for _ in range(n_dims)]
        ttype, offset = r.scalar("I"), r.scalar("Q")
        block, nbytes = _GGML_SIZES.get(ttype, (1, 0))
        n = 1
        for d in dims:
            n *= d
        end = max(end, offset + (n // block) * nbytes)
        if ttype not in _GGML_SIZES:
            raise r.corrupt(f"has tensor '{name}' of unknown type {ttype}")
    align = meta.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or align < 8 or align % 8:
        raise r.corrupt(f"has general.alignment {align!r} (must be a multiple of 8)")
    data_start = (r.pos + align - 1) // align * align
    if data_start + end > size:
        raise ModelFileError(
            f"GGUF file '{path}' is truncated: tensors need {data_start + end} bytes, file has "
            f"{size}: re-download or re-export it"
        )
    _check_special_ids(meta, path)
    return GGUFInfo(path=path, version=version, metadata=meta, n_tensors=n_tensors)


SPECIAL_IDS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")


def _check_special_ids(meta: dict, path: Path) -> None:
    """BOS and EOS, when given, must be token ids inside the vocabulary: an EOS outside it
    would never be sampled, so generation would never stop at the end of a reply."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        return  # no vocabulary to check against (the loader refuses such a base on its own)
    for key in SPECIAL_IDS:
        v = meta.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(tokens):
            raise ModelFileError(
                f"GGUF file '{path}' has {key} = {v!r}, outside its vocabulary of {len(tokens)} tokens "
                f"(0..{len(tokens) - 1}): the tokenizer metadata is wrong; re-convert the model or fix the "
                "field (gguf's gguf_set_metadata.py)"
            )


def vocab_fingerprint(tokens: list[str], n: int | None = None) -> str:
    """sha256 over the first n token strings: equal fingerprints mean equal token ids."""
    h = hashlib.sha256()
    for t in tokens[:n]:
        h.update(t.encode("utf-8", errors="surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()
