"""A corpus of malformed inputs built from the tiny fixture bundle, one class per kind of file.

Each case writes its files into a folder of its own and names the command line to run. The
test (test_malformed.py) runs every case as a real `edge-genarm` process and checks that it
ends in one clean line naming the file or field (or, for `may_run` cases, runs cleanly), never
a signal, a traceback or a hang. Files are built just before their case runs: the unchanged
files of a bundle are hard links to the fixture's, so a case costs almost no disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .gguf_edit import ARRAY, F32, STRING, U32, U64, parse

GEN = ["-n", "3", "--seed", "0"]


@dataclass
class Case:
    cls: str
    name: str
    build: Callable[[Path], list[str]]  # writes its files under the folder, returns the arguments
    expect: str  # regex the one-line error must match (the file or the field it names)
    may_run: bool = False  # a clean run is also a right answer (e.g. flipped bits in weights)
    stdin: bytes = b""


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def link_bundle(src: Path, dst: Path) -> Path:
    """A copy of bundle `src` whose files are hard links (replace a file, never write into it)."""
    for p in src.rglob("*"):
        q = dst / p.relative_to(src)
        if p.is_dir():
            q.mkdir(parents=True, exist_ok=True)
        else:
            q.parent.mkdir(parents=True, exist_ok=True)
            if p.name == "manifest.json":
                shutil.copyfile(p, q)
            else:
                os.link(p, q)
    return dst


def replace_file(bundle: Path, rel: str, data: bytes | None, record: bool = True) -> None:
    """Replace (or delete, data None) a bundle file; `record` re-records its size and sha256 so
    that the check under test is the one that catches it, not the hash check."""
    p = bundle / rel
    p.unlink(missing_ok=True)
    m = json.loads((bundle / "manifest.json").read_text())
    if data is None:
        m["files"].pop(rel, None)
    else:
        p.write_bytes(data)
        if record:
            m["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (bundle / "manifest.json").write_text(json.dumps(m))


def flip_bits(data: bytes, seed: int, n: int, lo: int = 0, hi: int | None = None) -> bytes:
    rng = random.Random(seed)
    b = bytearray(data)
    for _ in range(n):
        i = rng.randrange(lo, hi or len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into("<" + fmt, b, offset, value)
    return bytes(b)


# ---------------------------------------------------------------------------
# the corpus
# ---------------------------------------------------------------------------


def build_corpus(tiny: Path) -> list[Case]:
    cases: list[Case] = []
    cases += _gguf_cases(tiny)
    cases += _onnx_cases(tiny)
    cases += _tokens_cases(tiny)
    cases += _manifest_cases(tiny)
    cases += _argument_cases(tiny)
    cases += _prompt_file_cases(tiny)
    names = [(c.cls, c.name) for c in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    return cases


def _gguf_cases(tiny: Path) -> list[Case]:
    src = (tiny / "base.gguf").read_bytes()
    g0 = parse(src)
    out: list[Case] = []

    def bare(cls, name, make: Callable[[], bytes], may_run=False, expect=None, args=()):
        def build(d: Path) -> list[str]:
            p = d / f"{name}.gguf"
            p.write_bytes(make())
            return ["generate", "--weights", str(p), *GEN, *args, "Hi"]

        out.append(Case(cls, name, build, expect or rf"{name}\.gguf", may_run))

    def meta(**changes):  # key=(type, value) or None to drop; keys use __ for dots
        def make():
            g = parse(src)
            for k, v in changes.items():
                key = k.replace("__", ".")
                g.drop(key) if v is None else g.set(key, *v)
            return g.to_bytes()

        return make

    # truncations: inside the header, a key, the vocabulary, the tensor table, the data
    kv_tokens = g0.get("tokenizer.ggml.tokens")
    for n in (
        0,
        3,
        16,
        23,
        40,
        kv_tokens.offset + 1000,
        g0.table_start + 10,
        g0.data_start + 1000,
        len(src) - 1,
    ):
        bare("gguf-truncated", f"cut-{n}", lambda n=n: src[:n])
    # magic and version
    bare("gguf-magic-version", "magic-ggml", lambda: b"GGML" + src[4:])
    bare("gguf-magic-version", "magic-zero", lambda: b"\0\0\0\0" + src[4:])
    for v in (0, 1, 4, 0xFFFFFFFF):
        bare("gguf-magic-version", f"version-{v}", lambda v=v: patch(src, 4, "I", v))
    # huge or wrong counts and lengths
    t0 = g0.tensors[0]
    name_end = t0.info_offset + 8 + len(t0.name)
    n_tok = len(kv_tokens.value())
    counts = {
        "n-tensors-huge": (8, "Q", 2**63 - 1),
        "n-tensors-plus-one": (8, "Q", len(g0.tensors) + 1),
        "n-kv-huge": (16, "Q", 2**40),
        "n-kv-plus-one": (16, "Q", len(g0.kvs) + 1),
        "key-length-huge": (24, "Q", 2**60),
        "string-length-huge": (g0.get("general.name").offset, "Q", 2**30),
        "vocab-count-huge": (kv_tokens.offset + 4, "Q", 2**26 + 1),
        "vocab-count-plus-1000": (kv_tokens.offset + 4, "Q", n_tok + 1000),
        "merges-count-huge": (g0.get("tokenizer.ggml.merges").offset + 4, "Q", 2**40),
        "token-type-count-short": (g0.get("tokenizer.ggml.token_type").offset + 4, "Q", 1000),
        "tensor-n-dims-huge": (name_end, "I", 2**31),
        "tensor-dim-huge": (name_end + 4, "Q", 2**62),
        "tensor-offset-huge": (name_end + 4 + 8 * len(t0.dims) + 4, "Q", 2**63),
        "tensor-type-unknown": (name_end + 4 + 8 * len(t0.dims), "I", 999),
        "tensor-type-other": (name_end + 4 + 8 * len(t0.dims), "I", 8),  # q8_0: sizes no longer match
    }
    for name, (off, fmt, v) in counts.items():
        bare("gguf-counts", name, lambda off=off, fmt=fmt, v=v: patch(src, off, fmt, v))

    def tensors(edit):
        def make():
            g = parse(src)
            edit(g)
            return g.to_bytes()

        return make

    bare("gguf-counts", "tensor-5-dims", tensors(lambda g: g.tensors[0].dims.extend([1, 1, 1])))
    bare("gguf-counts", "tensor-wrong-shape", tensors(lambda g: g.tensors[0].dims.__setitem__(1, 100)))
    bare("gguf-counts", "tensor-missing", tensors(lambda g: g.tensors.pop()))
    bare("gguf-counts", "tensor-duplicate-name",
         tensors(lambda g: setattr(g.tensors[1], "name", g.tensors[0].name)))  # fmt: skip
    # scrambled vocabularies (a bare GGUF has nothing to compare with: running is fine)
    toks = kv_tokens.value()
    perm = toks[:]
    random.Random(0).shuffle(perm)
    swapped = toks[:]
    swapped[300], swapped[301] = swapped[301], swapped[300]
    bare("gguf-vocab", "shuffled", meta(tokenizer__ggml__tokens=(ARRAY, (STRING, perm))), may_run=True)
    bare("gguf-vocab", "swapped", meta(tokenizer__ggml__tokens=(ARRAY, (STRING, swapped))), may_run=True)
    bare(
        "gguf-vocab", "all-same", meta(tokenizer__ggml__tokens=(ARRAY, (STRING, ["a"] * n_tok))), may_run=True
    )
    bare("gguf-vocab", "short", meta(tokenizer__ggml__tokens=(ARRAY, (STRING, toks[:1000]))))
    bare(
        "gguf-vocab",
        "empty",
        meta(tokenizer__ggml__tokens=(ARRAY, (STRING, [])), tokenizer__ggml__token_type=None),
    )
    bare("gguf-vocab", "dropped", meta(tokenizer__ggml__tokens=None))
    bad_utf8 = toks[:300] + [b"\xff\xfe\xc0"] + toks[301:]
    bare("gguf-vocab", "bad-utf8", meta(tokenizer__ggml__tokens=(ARRAY, (STRING, bad_utf8))), may_run=True)
    bare("gguf-vocab", "bos-out-of-range", meta(tokenizer__ggml__bos_token_id=(U32, 10**9)))
    bare("gguf-vocab", "eos-out-of-range", meta(tokenizer__ggml__eos_token_id=(U32, 0xFFFFFFFF)))
    bare("gguf-vocab", "model-unknown", meta(tokenizer__ggml__model=(STRING, "zzzz")))
    bare(
        "gguf-vocab",
        "merges-garbage",
        meta(tokenizer__ggml__merges=(ARRAY, (STRING, ["x y z", "", "q"]))),
        may_run=True,
    )
    bare(
        "gguf-vocab",
        "token-type-strings",
        meta(tokenizer__ggml__token_type=(ARRAY, (STRING, ["x"] * n_tok))),
        may_run=True,
    )
    # flipped bits: in the header and tensor table (any outcome but a crash), in the weights
    for seed in range(6):
        bare(
            "gguf-bitflip",
            f"header-{seed}",
            lambda s=seed: flip_bits(src, s, 4, 0, g0.data_start),
            may_run=True,
        )
    for seed in range(2):
        bare(
            "gguf-bitflip", f"data-{seed}", lambda s=seed: flip_bits(src, s, 64, g0.data_start), may_run=True
        )
    # chat templates
    templates = {
        "unclosed-for": "{% for m in messages %}{{ m['content'] }}",
        "bool-not-iterable": "{% for m in add_generation_prompt %}{{ m }}{% endfor %}",
        "raises": "{{ raise_exception('no chat here') }}",
        "divides-by-zero": "{{ 1 / 0 }}",
        "undefined": "{{ messages[5]['content']['x'] }}",
        "sandbox-escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "drops-the-message": "{% for m in messages %}{% endfor %}<|im_start|>assistant\n",
        "renders-nothing": "{% if false %}x{% endif %}",
    }
    for name, t in templates.items():
        bare("gguf-chat-template", f"template-{name}", meta(tokenizer__chat_template=(STRING, t)),
             expect=rf"template-{name}\.gguf.*chat template|chat template.*template-{name}\.gguf")  # fmt: skip
    bare("gguf-chat-template", "template-a-number", meta(tokenizer__chat_template=(U32, 5)))
    bare(
        "gguf-chat-template", "template-a-list", meta(tokenizer__chat_template=(ARRAY, (STRING, ["{{ x }}"])))
    )
    bare("gguf-chat-template", "template-empty", meta(tokenizer__chat_template=(STRING, "")), may_run=True)
    bare(
        "gguf-chat-template",
        "template-bad-raw",
        meta(tokenizer__chat_template=(STRING, "{% for %}")),
        args=["--raw"],
    )
    # hyperparameters that disagree with the tensors
    hp = {
        "block-count-1000": ("llama.block_count", U32, 1000),
        "block-count-0": ("llama.block_count", U32, 0),
        "block-count-1": ("llama.block_count", U32, 1),
        "block-count-3": ("llama.block_count", U32, 3),
        "block-count-max": ("llama.block_count", U32, 0xFFFFFFFF),
        "block-count-string": ("llama.block_count", STRING, "2"),
        "embedding-63": ("llama.embedding_length", U32, 63),
        "embedding-0": ("llama.embedding_length", U32, 0),
        "heads-0": ("llama.attention.head_count", U32, 0),
        "heads-3": ("llama.attention.head_count", U32, 3),
        "kv-heads-0": ("llama.attention.head_count_kv", U32, 0),
        "kv-heads-3": ("llama.attention.head_count_kv", U32, 3),
        "context-0": ("llama.context_length", U32, 0),
        "ffn-0": ("llama.feed_forward_length", U32, 0),
        "rope-dims-1000": ("llama.rope.dimension_count", U32, 1000),
        "rms-eps-nan": ("llama.attention.layer_norm_rms_epsilon", F32, float("nan")),
        "vocab-size-10": ("llama.vocab_size", U32, 10),
        "architecture-unknown": ("general.architecture", STRING, "nonsense"),
        "alignment-0": ("general.alignment", U32, 0),
        "alignment-7": ("general.alignment", U32, 7),
        "alignment-string": ("general.alignment", STRING, "32"),
        "add-bos-string": ("tokenizer.ggml.add_bos_token", STRING, "yes"),
        "add-bos-u64": ("tokenizer.ggml.add_bos_token", U64, 2**40),
    }
    may = {
        "rms-eps-nan",
        "rope-dims-1000",
        "block-count-string",
        "add-bos-string",
        "add-bos-u64",
        "context-0",
        "vocab-size-10",
    }  # llama.cpp sizes the vocabulary from the tokens; the key is not used
    for name, (key, t, v) in hp.items():
        bare("gguf-hparams", name, meta(**{key.replace(".", "__"): (t, v)}), may_run=name in may)
    bare("gguf-hparams", "architecture-dropped", meta(general__architecture=None))

    def dup():
        g = parse(src)
        g.kvs.append(g.get("llama.block_count"))
        return g.to_bytes()

    bare("gguf-hparams", "duplicate-key", dup)

    # a scrambled vocabulary inside a bundle, its file record updated: the manifest's
    # tokenizer fingerprint (and every ARM's tokens) must refuse it
    def in_bundle(d: Path) -> list[str]:
        b = link_bundle(tiny, d / "bundle")
        replace_file(b, "base.gguf", meta(tokenizer__ggml__tokens=(ARRAY, (STRING, swapped)))())
        m = json.loads((b / "manifest.json").read_text())
        m["arms"] = {}
        (b / "manifest.json").write_text(json.dumps(m))
        return ["generate", "--weights", str(b), *GEN, "Hi"]

    out.append(Case("gguf-vocab", "swapped-in-bundle", in_bundle, r"base\.gguf.*(tokenizer|vocab)"))

    def in_bundle_arms(d: Path) -> list[str]:
        b = link_bundle(tiny, d / "bundle")
        replace_file(b, "base.gguf", meta(tokenizer__ggml__tokens=(ARRAY, (STRING, swapped)))())
        return ["generate", "--weights", str(b), *GEN, "Hi"]

    out.append(
        Case("gguf-vocab", "swapped-with-arms", in_bundle_arms, r"base\.gguf.*(tokenizer|vocab)|token id 300")
    )
    return out


def _onnx_cases(tiny: Path) -> list[Case]:
    rel = "arms/alpha/model.onnx"
    src = (tiny / rel).read_bytes()
    out: list[Case] = []

    def case(
        name,
        make: Callable[[Path], bytes | None],
        may_run=False,
        expect=r"alpha.*model\.onnx|model\.onnx.*alpha",
    ):
        def build(d: Path) -> list[str]:
            b = link_bundle(tiny, d / "bundle")
            replace_file(b, rel, make(b))
            return ["generate", "--weights", str(b), *GEN, "Hi"]

        out.append(Case("onnx", name, build, expect, may_run))

    case("empty", lambda b: b"")
    case("cut-1000", lambda b: src[:1000])
    case("cut-half", lambda b: src[: len(src) // 2])
    case("cut-last-byte", lambda b: src[:-1])
    case("random-4k", lambda b: random.Random(1).randbytes(4096))
    case("random-same-size", lambda b: random.Random(2).randbytes(len(src)))
    case("text", lambda b: b"this is not an onnx model\n" * 10)
    for seed in range(4):
        case(f"bitflip-{seed}", lambda b, s=seed: flip_bits(src, s, 8), may_run=True)
    for seed in range(2):  # in the protobuf structure before the weights
        case(f"bitflip-head-{seed}", lambda b, s=seed: flip_bits(src, 100 + s, 4, 0, 4096), may_run=True)

    def other_graph(b: Path) -> bytes:
        from onnx import TensorProto, helper

        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()

    case("not-a-causal-lm", other_graph)

    def edited(edit):
        def make(b: Path) -> bytes:
            import onnx

            m = onnx.load_from_string(src)
            edit(m)
            return m.SerializeToString()

        return make

    def small_head(m):  # the LM head [hidden, vocab] -> [hidden, 10]: the ARM scores 10 ids
        from onnx import numpy_helper

        for init in m.graph.initializer:
            if len(init.dims) == 2 and init.dims[1] == 49152 and init.dims[0] != 49152:
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[:, :10].copy(), init.name))
        for o in m.graph.output:
            if o.name == "logits":
                o.type.tensor_type.shape.dim[2].dim_value = 10

    def wrong_shape(m):  # a projection that cannot multiply: fails when run, not when loaded
        import numpy as np
        from onnx import numpy_helper

        for init in m.graph.initializer:
            if len(init.dims) == 2 and init.dims[0] == 64 and init.dims[1] == 64:
                a = numpy_helper.to_array(init)
                init.CopyFrom(numpy_helper.from_array(np.zeros((64, 7), a.dtype), init.name))
                break

    case("vocab-10-declared", edited(small_head), expect=r"alpha.*(tokens\.json|model\.onnx)")
    case("matmul-wrong-shape", edited(wrong_shape))

    def external_missing(b: Path) -> bytes:
        import onnx

        m = onnx.load_from_string(src)
        onnx.save(m, str(b / "arms" / "alpha" / "x.onnx"), save_as_external_data=True,
                  location="model.onnx_data", size_threshold=1024)  # fmt: skip
        data = (b / "arms" / "alpha" / "x.onnx").read_bytes()
        (b / "arms" / "alpha" / "x.onnx").unlink()
        (b / "arms" / "alpha" / "model.onnx_data").unlink()
        return data

    case("external-data-missing", external_missing)

    def loose(d: Path) -> list[str]:  # --arm PATH.onnx with its tokens beside it, outside a bundle
        a = d / "loose"
        a.mkdir()
        (a / "model.onnx").write_bytes(src[: len(src) // 3])
        os.link(tiny / "arms/alpha/tokens.json", a / "tokens.json")
        return ["generate", "--weights", str(tiny), "--arm", f"{a / 'model.onnx'}=1", *GEN, "Hi"]

    out.append(Case("onnx", "loose-truncated", loose, r"loose.*model\.onnx"))

    def loose_no_tokens(d: Path) -> list[str]:
        a = d / "notokens"
        a.mkdir()
        os.link(tiny / rel, a / "model.onnx")
        return ["generate", "--weights", str(tiny), "--arm", f"{a / 'model.onnx'}=1", *GEN, "Hi"]

    out.append(Case("onnx", "loose-without-tokens", loose_no_tokens, r"notokens.*tokens\.json"))
    return out


def _tokens_cases(tiny: Path) -> list[Case]:
    rel = "arms/alpha/tokens.json"
    toks = json.loads((tiny / rel).read_text())
    out: list[Case] = []

    def case(name, data: bytes | None, may_run=False, expect=r"alpha.*tokens\.json|tokens\.json.*alpha"):
        def build(d: Path) -> list[str]:
            b = link_bundle(tiny, d / "bundle")
            replace_file(b, rel, data)
            return ["generate", "--weights", str(b), *GEN, "Hi"]

        out.append(Case("tokens-json", name, build, expect, may_run))

    j = lambda x: json.dumps(x).encode()  # noqa: E731
    swapped = toks[:]
    swapped[100], swapped[101] = swapped[101], swapped[100]
    case("not-json", b"{not json")
    case("empty-file", b"")
    case("empty-list", b"[]")
    case("empty-object", b"{}")
    case("null", b"null")
    case("a-string", b'"abc"')
    case("a-number", b"42")
    case("list-of-ints", j(list(range(len(toks)))))
    case("list-with-null", j(toks[:5] + [None] + toks[6:]))
    case("first-10", j(toks[:10]))
    case("one-short", j(toks[:-1]))
    case("padded", j(toks + ["<pad>"]))  # 49153 tokens for a graph that scores 49152 ids
    case("swapped", j(swapped), expect=r"alpha.*token id 100")
    case("not-utf8", b'["\xff\xfe"]')
    case("deeply-nested", b"[" * 100000 + b"]" * 100000)
    case("vocab-a-list", j({"model": {"vocab": ["a", "b"]}}))
    case("vocab-id-huge", j({"model": {"vocab": {"a": 10**12}}}))
    case("vocab-id-negative", j({"model": {"vocab": {t: i - 1 for i, t in enumerate(toks)}}}))
    case("vocab-id-string", j({"model": {"vocab": {"a": "zero"}}}))
    case(
        "added-tokens-bad",
        j({"model": {"vocab": {t: i for i, t in enumerate(toks)}}, "added_tokens": [{"id": "x"}]}),
    )
    case("missing", None)
    return out


def _manifest_cases(tiny: Path) -> list[Case]:
    m0 = json.loads((tiny / "manifest.json").read_text())
    out: list[Case] = []

    def case(name, make: Callable[[dict], object], expect: str, raw: bytes | None = None, may_run=False):
        def build(d: Path) -> list[str]:
            b = link_bundle(tiny, d / "bundle")
            if raw is not None:
                (b / "manifest.json").write_bytes(raw)
            else:
                m = json.loads(json.dumps(m0))
                make(m)  # edits in place
                (b / "manifest.json").write_text(json.dumps(m, allow_nan=True))
            return ["generate", "--weights", str(b), *GEN, "Hi"]

        out.append(Case("manifest", name, build, expect, may_run))

    def setp(path: str, value):
        def make(m):
            *keys, last = path.split(".")
            d = m
            for k in keys:
                d = d[k]
            d[last] = value

        return make

    def delp(path: str):
        def make(m):
            *keys, last = path.split(".")
            d = m
            for k in keys:
                d = d[k]
            del d[last]

        return make

    M = r"manifest\.json"
    case("not-json", None, M, raw=b"{not json")
    case("empty-file", None, M, raw=b"")
    case("not-utf8", None, M, raw=b'{"format": "\xff"}')
    case("a-list", None, M, raw=json.dumps([m0]).encode())
    case("null", None, M, raw=b"null")
    case("a-string", None, M, raw=b'"manifest"')
    case("empty-object", None, M, raw=b"{}")
    case("format-wrong", setp("format", "something-else"), rf"{M}.*format")
    case("format-version-string", setp("format_version", "abc"), rf"{M}.*format_version")
    case("format-version-newer", setp("format_version", 99), rf"{M}.*(format|newer)")
    case("format-version-float", setp("format_version", 1.5), rf"{M}.*format_version")
    case("base-missing", delp("base"), rf"{M}.*base")
    case("base-a-string", setp("base", "base.gguf"), rf"{M}.*base")
    case("base-file-missing", delp("base.file"), rf"{M}.*base.*file")
    case("base-file-number", setp("base.file", 5), rf"{M}.*base.*file")
    case("base-file-escapes", setp("base.file", "../../../../etc/passwd"), rf"{M}.*base.*file")
    case("base-file-absolute", setp("base.file", "/etc/passwd"), rf"{M}.*base.*file")
    case("base-file-absent", setp("base.file", "nope.gguf"), r"nope\.gguf")
    case("arms-a-list", setp("arms", ["alpha"]), rf"{M}.*arms")
    case("arm-a-string", setp("arms.alpha", "alpha.onnx"), rf"{M}.*alpha")
    case("arm-file-missing", delp("arms.alpha.file"), rf"{M}.*alpha.*file")
    case("arm-file-number", setp("arms.alpha.file", 7), rf"{M}.*alpha.*file")
    case("arm-file-escapes", setp("arms.alpha.file", "../../x.onnx"), rf"{M}.*alpha.*file")
    case("arm-tokens-null", setp("arms.alpha.tokens", None), r"alpha.*tokens")
    case("arm-tokens-number", setp("arms.alpha.tokens", 3), rf"{M}.*alpha.*tokens")
    case("beta-r-string", setp("arms.alpha.beta_r", "abc"), rf"{M}.*alpha.*beta_r")
    case("beta-r-nan", setp("arms.alpha.beta_r", float("nan")), rf"{M}.*alpha.*beta_r")
    case("beta-r-negative", setp("arms.alpha.beta_r", -1.0), rf"{M}.*alpha.*beta_r")
    case("beta-r-bool", setp("arms.alpha.beta_r", True), rf"{M}.*alpha.*beta_r")
    case("weight-string-nan", setp("arms.alpha.default_weight", "NaN"), rf"{M}.*alpha.*default_weight")
    case("weight-string", setp("arms.alpha.default_weight", "abc"), rf"{M}.*alpha.*default_weight")
    case("weight-nan", setp("arms.alpha.default_weight", float("nan")), rf"{M}.*alpha.*default_weight")
    case("weight-inf", None, rf"{M}.*alpha.*default_weight",
         raw=json.dumps(m0).replace('"default_weight": 1.0', '"default_weight": 1e999', 1).encode())  # fmt: skip
    case("weight-bool", setp("arms.alpha.default_weight", True), rf"{M}.*alpha.*default_weight")
    case("weight-list", setp("arms.alpha.default_weight", [1]), rf"{M}.*alpha.*default_weight")
    case("files-a-list", setp("files", []), rf"{M}.*files")
    case("file-record-a-string", lambda m: m["files"].update({"base.gguf": "x"}), rf"{M}.*base\.gguf")
    case("file-size-string", lambda m: m["files"]["base.gguf"].update(size="big"), rf"{M}.*base\.gguf.*size")
    case("file-size-negative", lambda m: m["files"]["base.gguf"].update(size=-1), rf"{M}.*base\.gguf.*size")
    case("file-sha-missing", lambda m: m["files"]["base.gguf"].pop("sha256"), rf"{M}.*base\.gguf.*sha256")
    case(
        "file-sha-short", lambda m: m["files"]["base.gguf"].update(sha256="abc"), rf"{M}.*base\.gguf.*sha256"
    )
    case("file-sha-wrong", lambda m: m["files"]["base.gguf"].update(sha256="0" * 64), r"base\.gguf.*sha256")
    case("file-size-wrong", lambda m: m["files"]["base.gguf"].update(size=5), r"base\.gguf.*bytes")
    case("file-key-escapes", lambda m: m["files"].update({"../x": m["files"]["base.gguf"]}), rf"{M}.*\.\./x")
    case("unknown-key", setp("frobnicate", 1), rf"{M}.*frobnicate")
    case("unknown-arm-key", setp("arms.alpha.wieght", 1), rf"{M}.*alpha.*wieght")
    case("trunk-unknown", setp("arms.alpha.trunk", "abc"), rf"{M}.*alpha.*trunk")
    case("trunks-a-list", setp("trunks", []), rf"{M}.*trunks")
    case("chat-template-number", setp("chat_template", 5), rf"{M}.*chat_template")
    case("chat-template-broken", setp("chat_template", "{% for m in messages %}"), rf"{M}.*chat.template")
    case("nudges-a-string", setp("nudges", "nudges.npz"), rf"{M}.*nudges")
    case("nudges-file-absent", setp("nudges", {"file": "nudges.npz"}), r"nudges\.npz")
    case("placement-a-list", setp("placement", []), rf"{M}.*placement")
    case("placement-record-bad", setp("placement", {"alpha,beta": "fast"}), rf"{M}.*placement")
    case("created-by-number", setp("created_by", 5), rf"{M}.*created_by")
    return out


def _argument_cases(tiny: Path) -> list[Case]:
    out: list[Case] = []
    W = str(tiny)

    def case(name, args: list[str], expect: str, may_run=False, stdin=b""):
        out.append(Case("arguments", name, lambda d, a=args: ["generate", *a], expect, may_run, stdin))

    def gen(*a, prompt="Hi"):
        return ["--weights", W, *GEN, *a, prompt]

    case("ctx-8", gen("--ctx", "8"), r"8.token context|context holds 8|--ctx")
    case("ctx-0", gen("--ctx", "0"), r"--ctx|ctx")
    case("ctx-negative", gen("--ctx", "-5"), r"--ctx|ctx")
    case("ctx-not-a-number", gen("--ctx", "big"), r"--ctx")
    case("max-tokens-negative", gen("-n", "-1"), r"max.tokens")
    case("temperature-negative", gen("--temperature", "-1"), r"temperature")
    case("temperature-nan", gen("--temperature", "nan"), r"temperature")
    case("temperature-word", gen("--temperature", "warm"), r"temperature|temp")
    case("top-k-negative", gen("--top-k", "-1"), r"top.k")
    case("top-p-2", gen("--top-p", "2"), r"top.p")
    case("min-p-negative", gen("--min-p", "-0.5"), r"min.p")
    case("repeat-penalty-0", gen("--repeat-penalty", "0"), r"repeat.penalty")
    case("repeat-last-n-negative", gen("--repeat-last-n", "-1"), r"repeat.last.n")
    case("dry-nan", gen("--dry-multiplier", "nan"), r"dry")
    case("seed-negative", gen("--seed", "-1"), r"seed")
    case("threads-negative", gen("--threads", "-1"), r"threads")
    case("arm-threads-negative", gen("--arm-threads", "-2"), r"arm.threads")
    case("gpu-layers-negative", gen("--gpu-layers", "-5"), r"gpu.layers")
    case("arm-no-name", gen("--arm", "=1"), r"--arm")
    case("arm-weight-nan", gen("--arm", "alpha=nan"), r"alpha")
    case("arm-weight-inf", gen("--arm", "alpha=inf"), r"alpha")
    case("arm-weight-word", gen("--arm", "alpha=lots"), r"alpha")
    case("arm-unknown", gen("--arm", "gamma=1"), r"gamma")
    case("arm-path-absent", gen("--arm", "/nonexistent/x.onnx=1"), r"/nonexistent/x\.onnx")
    case("weights-absent", ["--weights", "/nonexistent/bundle", *GEN, "Hi"], r"/nonexistent/bundle")
    case(
        "weights-an-onnx-file", ["--weights", str(tiny / "arms/alpha/model.onnx"), *GEN, "Hi"], r"model\.onnx"
    )
    case("weights-empty", ["--weights", "", *GEN, "Hi"], r"weights|bundle")
    case("nudge-k-0", gen("--nudge", "--nudge-k", "0"), r"nudge top-K")
    case("nudge-tau-nan", gen("--nudge", "--nudge-tau", "nan"), r"tau")
    case("nudge-rollouts-negative", gen("--nudge", "--nudge-rollouts", "-1"), r"rollouts")
    case(
        "nudge-rollout-len-0",
        gen("--nudge", "--nudge-rollouts", "2", "--nudge-rollout-len", "0"),
        r"rollout.len",
    )
    case("nudge-mode-bogus", gen("--nudge", "--nudge-mode", "bogus"), r"nudge-mode")
    case("empty-prompt", gen(prompt=""), r"prompt")
    case("blank-prompt-stdin", ["--weights", W, *GEN], r"prompt", stdin=b"")
    case("stdin-not-utf8", ["--weights", W, *GEN], r"stdin|standard input|UTF-8", stdin=b"\xff\xfe bad \xc0")
    case("stop-empty", gen("--stop", ""), r"stop")

    def template_file(d: Path, name: str, data: bytes) -> list[str]:
        p = d / name
        p.write_bytes(data)
        return ["generate", *gen("--chat-template", str(p))]

    out.append(Case("arguments", "chat-template-file-broken",
                    lambda d: template_file(d, "broken.jinja", b"{% for m in messages %}"), r"broken\.jinja"))  # fmt: skip
    out.append(Case("arguments", "chat-template-file-not-utf8",
                    lambda d: template_file(d, "binary.jinja", b"\xff\xfe{{ x }}"), r"binary\.jinja"))  # fmt: skip
    out.append(Case("arguments", "chat-template-file-raises",
                    lambda d: template_file(d, "raise.jinja", b"{{ 1/0 }}"), r"raise\.jinja"))  # fmt: skip
    return out


def _prompt_file_cases(tiny: Path) -> list[Case]:
    out: list[Case] = []

    def case(name, data: bytes | None, expect=None):
        def build(d: Path) -> list[str]:
            p = d / f"{name}.jsonl"
            if data is None:
                p.mkdir()
            else:
                p.write_bytes(data)
            return [
                "calibrate-tau",
                "--weights",
                str(tiny),
                "--prompts",
                str(p),
                "--n",
                "1",
                "--max-tokens",
                "2",
            ]

        out.append(Case("prompt-file", name, build, expect or rf"{name}\.jsonl"))

    case("empty", b"")
    case("blank-lines", b"\n\n  \n")
    case("not-utf8", b'{"prompt": "\xff\xfe"}\n')
    case("not-json", b'{"prompt": "a"}\n{oops\n', expect=r"not-json\.jsonl line 2")
    case("a-list-line", b'["prompt", "a"]\n', expect=r"a-list-line\.jsonl line 1")
    case("prompt-a-number", b'{"prompt": 5}\n', expect=r"prompt-a-number\.jsonl line 1")
    case("prompt-empty", b'{"prompt": ""}\n', expect=r"prompt-empty\.jsonl line 1")
    case("no-prompt-key", b'{"text": "hello"}\n', expect=r"no-prompt-key\.jsonl line 1")
    case("binary", random.Random(3).randbytes(2000))
    case("a-directory", None)
    case(
        "nested-deep",
        b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}\n",
        expect=r"nested-deep\.jsonl line 1",
    )
    return out
