"""SentencePiece ('llama') GGUF vocabularies as Hugging Face `tokenizers` objects.

llama.cpp's SPM tokenizer (llama-vocab.cpp, `llm_tokenizer_spm`), which the runtime uses:
  1. control tokens (with special=True) and user-defined tokens are cut out of the raw text,
     longest token first;
  2. each remaining fragment gets a leading ' ' if `add_space_prefix`, and ' ' becomes '▁';
  3. the fragment starts as one symbol per character; the adjacent pair whose concatenation is
     a token of highest score is merged, ties to the leftmost, until no pair is a token;
  4. a symbol that is not a token becomes its bytes' <0xNN> tokens.
Step 3 is BPE whose merge list holds every split (a, b) of every token t = a + b with a and b
tokens, ranked by t's score: that is the BPE model built here, with a normalizer for step 2,
byte fallback for step 4 and added tokens for step 1. `check_rebuild` refuses vocabularies this
cannot express exactly (e.g. a token built from a character that is not itself a token), and
`verify_against_llama` compares the rebuild with llama.cpp token for token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from edge_genarm.errors import ModelFileError
from edge_genarm.gguf import GGUFInfo

SPACE = "\u2581"  # '▁', SentencePiece's space marker
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class VocabRebuildError(ModelFileError):
    """A GGUF vocabulary that cannot be rebuilt exactly as a Hugging Face tokenizer."""


def _refuse(info: GGUFInfo, what: str) -> VocabRebuildError:
    return VocabRebuildError(
        f"the SentencePiece vocabulary of '{info.path}' cannot be rebuilt exactly as a Hugging Face "
        f"tokenizer: {what}; an approximate tokenizer would train the ARM on other token ids than "
        "the base sees: start from the model's Hugging Face checkpoint instead"
    )


def check_rebuild(info: GGUFInfo) -> None:
    """Refuse (VocabRebuildError, naming the first offending token) what BPE cannot express:
    duplicate token strings, missing <0xNN> byte tokens, a multi-character token with a character
    that is not a token (llama.cpp can merge such a character, BPE with byte fallback cannot)."""
    tokens, types = info.tokens, _types(info)
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in seen:
            raise _refuse(info, f"token {i} {t!r} repeats token {seen[t]}")
        seen[t] = i
    for b in range(256):
        if f"<0x{b:02X}>" not in seen:
            raise _refuse(info, f"it has no byte-fallback token <0x{b:02X}>")
    for i, t in enumerate(tokens):
        if types[i] in (NORMAL, UNUSED) and len(t) > 1:
            missing = next((c for c in t if c not in seen), None)
            if missing is not None:
                raise _refuse(info, f"token {i} {t!r} holds the character {missing!r}, which is not a token")


def _types(info: GGUFInfo) -> list[int]:
    return list(info.get("tokenizer.ggml.token_type") or [NORMAL] * len(info.tokens))


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every (a, b) with a, b and a + b tokens, ranked by the score of a + b (highest first;
    equal scores by token id, then by the split)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for i, t in enumerate(tokens):
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                found.append((-scores[i], i, k, a, b))
    found.sort()
    return [(a, b) for _, _, _, a, b in found]


def build_spm_tokenizer(info: GGUFInfo):
    """The `tokenizers.Tokenizer` for a 'llama' GGUF vocabulary (see the module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    check_rebuild(info)
    tokens, types = info.tokens, _types(info)
    scores = list(info.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = info.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=spm_merges(tokens, scores),
            unk_token=tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None,
            byte_fallback=True,
            fuse_unk=False,
        )
    )
    prefix = bool(info.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend(SPACE)] if prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(Regex(" "), SPACE)])
    tok.pre_tokenizer = None  # llama.cpp merges over the whole fragment: no pre-split
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    # user-defined tokens are cut out even with special=False, control/unknown ones only with it
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    )
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty in (CONTROL, UNKNOWN)
        ]
    )
    tok.post_processor = _post_processor(info)
    return tok


def _post_processor(info: GGUFInfo):
    """BOS/EOS added as llama.cpp adds them (add_bos_token, default on for SentencePiece; add_eos_token)."""
    from tokenizers import processors

    tokens, ends = info.tokens, []
    for key, default in (("bos", True), ("eos", False)):
        i = info.get(f"tokenizer.ggml.{key}_token_id")
        on = bool(info.get(f"tokenizer.ggml.add_{key}_token", default))
        ends.append((tokens[i], i) if on and isinstance(i, int) and 0 <= i < len(tokens) else None)
    bos, eos = ends

    def seq(piece: str, part: int) -> list[str]:
        return (
            ([f"{bos[0]}:{part}"] if bos else [])
            + [f"{piece}:{part}"]
            + ([f"{eos[0]}:{part}"] if eos else [])
        )

    return processors.TemplateProcessing(
        single=seq("$A", 0), pair=seq("$A", 0) + seq("$B", 1), special_tokens=[e for e in ends if e]
    )


# ---------------------------------------------------------------------------
# the check against llama.cpp
# ---------------------------------------------------------------------------

# varied text: the rebuild is checked on these and on text made of the vocabulary's own tokens
PROBE_TEXTS = [
    "Hello world!",
    " Hello  world ",
    "The quick brown fox jumps over the lazy dog.",
    "line one\nline two\n\n\nindented:\n\tTab\t\tand  two  spaces   three",
    "    four leading spaces, trailing      ",
    "12345 3.14159 1,000,000 2026-12-03 0x1F 007",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "if (a && b) { x += y; } else { z--; }",
    "Größe, naïve café, Ærøskøbing, İstanbul",
    "Привет, мир! Γειά σου κόσμε. שלום עולם. مرحبا بالعالم",
    "日本語のテキストと中文文本，한국어 텍스트。",
    "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷 ✨",
    "<html><body><b>bold</b> and <i>italic</i></body></html>",
    "<bos> <eos> <unk> <start_of_turn>user\nhi<end_of_turn>",
    "<0x41> <0x00> ▁ ▁▁ ... --- ***",
    "\u200b zero width \u00a0 nbsp \u3000 ideographic space",
    "a" * 40 + " " + "ab" * 20,
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "\r\n windows line end \r",
    "\ue000\U0001f9ff\U00010348 rare code points 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def vocab_texts(tokens: list[str], types: list[int], n: int = 40, per: int = 12, seed: int = 0) -> list[str]:
    """n texts, each `per` randomly chosen normal tokens of the vocabulary glued together ('▁' as ' ')."""
    import random

    rng = random.Random(seed)
    normal = [t for t, ty in zip(tokens, types) if ty == NORMAL]
    if not normal:
        return []
    return ["".join(rng.choice(normal) for _ in range(per)).replace(SPACE, " ") for _ in range(n)]


_CHILD = r"""
import json, sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
texts = json.load(sys.stdin)
out = [[llm.tokenize(t.encode("utf-8"), add_bos=False, special=s) for s in (True, False)] for t in texts]
print(json.dumps(out))
"""


def llama_token_ids(path: str | Path, texts: list[str], timeout: float = 300.0) -> list[list[list[int]]]:
    """[[ids with special=True, ids with special=False] per text] from llama.cpp's own tokenizer,
    in a child process (llama.cpp aborts the whole process on some vocabularies)."""
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise ModelFileError(f"llama.cpp could not tokenize with the vocabulary of '{path}': {tail[:200]}")
    return json.loads(proc.stdout)


def first_difference(ours: list[int], theirs: list[int]) -> int | None:
    """Index of the first differing id (or where one list ends), None when equal."""
    if ours == theirs:
        return None
    return next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))


def verify_against_llama(tok, info: GGUFInfo, texts: list[str] | None = None) -> dict:
    """Tokenize `texts` (default: PROBE_TEXTS + vocab_texts) with `tok` (a tokenizers.Tokenizer)
    and with llama.cpp, special tokens parsed and not; VocabRebuildError at the first differing
    token. Returns {"texts": n, "tokens": ids compared, "mismatches": 0}."""
    if texts is None:
        texts = PROBE_TEXTS + vocab_texts(info.tokens, _types(info))
    ref = llama_token_ids(info.path, texts)
    compared = 0
    for text, (with_special, without) in zip(texts, ref):
        for split, theirs in ((False, with_special), (True, without)):
            ours = _encode(tok, text, split)
            at = first_difference(ours, theirs)
            if at is not None:
                raise _refuse(info, _describe(info.tokens, text, ours, theirs, at, not split))
            compared += len(theirs)
    return {"texts": len(texts), "tokens": compared, "mismatches": 0}


def _encode(tok, text: str, split_special: bool) -> list[int]:
    tok.encode_special_tokens = split_special  # True: control tokens in the text are plain text
    try:
        return tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = False


def _describe(tokens, text, ours, theirs, at, special) -> str:
    def name(ids):
        return f"{ids[at]} {tokens[ids[at]]!r}" if at < len(ids) else "the end"

    return (
        f"on the text {text[:60]!r} (special tokens {'parsed' if special else 'as text'}) token {at} "
        f"differs: llama.cpp has {name(theirs)}, the rebuild has {name(ours)}"
    )


def build_spm_fast(info: GGUFInfo, verify: bool = True):
    """A transformers PreTrainedTokenizerFast for a 'llama' GGUF vocabulary, with the GGUF's
    BOS/EOS/UNK/PAD, add_bos/add_eos and chat template; with `verify`, checked token for token
    against llama.cpp first (VocabRebuildError at the first differing token). The check's
    figures are kept on the result as `gguf_check`."""
    from transformers import PreTrainedTokenizerFast

    tok = build_spm_tokenizer(info)
    check = verify_against_llama(tok, info) if verify else None
    tokens = info.tokens

    def name(key):
        i = info.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=name("bos"),
        eos_token=name("eos"),
        unk_token=name("unknown"),
        pad_token=name("padding"),
        add_bos_token=bool(info.get("tokenizer.ggml.add_bos_token", True)),
        add_eos_token=bool(info.get("tokenizer.ggml.add_eos_token", False)),
        clean_up_tokenization_spaces=False,
    )
    template = info.get("tokenizer.chat_template")
    if template:
        fast.chat_template = template
    fast.gguf_check = check
    return fast
