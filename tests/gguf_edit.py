"""Rewrite GGUF files for the malformed-input tests: set, drop or retype metadata, patch raw
header fields. Written from the GGUF spec independently of edge_genarm/gguf.py, so a bug in
the reader under test cannot hide itself here.

    header:  magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    kv:      string key | u32 type | value          (string = u64 length + bytes)
    tensor:  string name | u32 n_dims | u64 dims[n_dims] | u32 ggml type | u64 offset
    data:    aligned to general.alignment (32), tensor offsets relative to its start
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
U32, I32, U64, F32, BOOL = 4, 5, 10, 6, 7


@dataclass
class KV:
    key: str
    type: int
    raw: bytes  # the encoded value (without key and type)
    offset: int  # where the value starts in the source file

    def value(self):
        return _decode(self.type, self.raw, 0)[0]


@dataclass
class Tensor:
    name: str
    dims: list[int]
    type: int
    offset: int
    info_offset: int  # where its name starts in the source file


@dataclass
class GGUF:
    version: int
    kvs: list[KV]
    tensors: list[Tensor]
    data: bytes  # the tensor data section
    data_start: int  # offset of the data section in the source file
    table_start: int  # offset of the first tensor info
    extra: dict = field(default_factory=dict)

    def get(self, key):
        return next(kv for kv in self.kvs if kv.key == key)

    def set(self, key: str, type_: int, value) -> GGUF:
        """Set (or add) a key to a value of GGUF type `type_` (arrays: (item type, list))."""
        raw = encode(type_, value)
        for kv in self.kvs:
            if kv.key == key:
                kv.type, kv.raw = type_, raw
                return self
        self.kvs.append(KV(key, type_, raw, -1))
        return self

    def drop(self, key: str) -> GGUF:
        self.kvs = [kv for kv in self.kvs if kv.key != key]
        return self

    def to_bytes(self) -> bytes:
        out = bytearray(b"GGUF" + struct.pack("<IQQ", self.version, len(self.tensors), len(self.kvs)))
        for kv in self.kvs:
            out += _string(kv.key) + struct.pack("<I", kv.type) + kv.raw
        for t in self.tensors:
            out += _string(t.name) + struct.pack("<I", len(t.dims))
            out += b"".join(struct.pack("<Q", d) for d in t.dims) + struct.pack("<IQ", t.type, t.offset)
        align = 32
        for kv in self.kvs:
            if kv.key == "general.alignment" and kv.type in SCALAR:
                align = max(1, int(kv.value()))
        out += b"\0" * (-len(out) % align)
        return bytes(out) + self.data


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def encode(type_: int, value) -> bytes:
    if type_ in SCALAR:
        return struct.pack("<" + SCALAR[type_], value)
    if type_ == STRING:
        return _string(value)
    item, items = value
    return struct.pack("<IQ", item, len(items)) + b"".join(encode(item, v) for v in items)


def _decode(type_: int, data: bytes, pos: int):
    if type_ in SCALAR:
        fmt = "<" + SCALAR[type_]
        return struct.unpack_from(fmt, data, pos)[0], pos + struct.calcsize(fmt)
    if type_ == STRING:
        (n,) = struct.unpack_from("<Q", data, pos)
        return data[pos + 8 : pos + 8 + n].decode("utf-8", "replace"), pos + 8 + n
    if type_ == ARRAY:
        item, n = struct.unpack_from("<IQ", data, pos)
        pos += 12
        out = []
        for _ in range(n):
            v, pos = _decode(item, data, pos)
            out.append(v)
        return out, pos
    raise ValueError(f"type {type_}")


def _skip(type_: int, data: bytes, pos: int) -> int:
    """End of a value starting at pos (arrays of scalars skipped without decoding)."""
    if type_ == ARRAY:
        item, n = struct.unpack_from("<IQ", data, pos)
        if item in SCALAR:
            return pos + 12 + n * struct.calcsize("<" + SCALAR[item])
        pos += 12
        for _ in range(n):
            pos = _skip(item, data, pos)
        return pos
    return _decode(type_, data, pos)[1]


def parse(data: bytes) -> GGUF:
    assert data[:4] == b"GGUF"
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    pos, kvs = 24, []
    for _ in range(n_kv):
        key, pos = _decode(STRING, data, pos)
        (t,) = struct.unpack_from("<I", data, pos)
        start = pos + 4
        pos = _skip(t, data, start)
        kvs.append(KV(key, t, data[start:pos], start))
    table_start, tensors = pos, []
    for _ in range(n_tensors):
        at = pos
        name, pos = _decode(STRING, data, pos)
        (nd,) = struct.unpack_from("<I", data, pos)
        dims = list(struct.unpack_from(f"<{nd}Q", data, pos + 4))
        pos += 4 + 8 * nd
        t, off = struct.unpack_from("<IQ", data, pos)
        pos += 12
        tensors.append(Tensor(name, dims, t, off, at))
    align = next((int(kv.value()) for kv in kvs if kv.key == "general.alignment"), 32)
    start = (pos + align - 1) // align * align
    return GGUF(version, kvs, tensors, data[start:], start, table_start)
