"""The token checks: a model that scores the base's token ids must share the base's tokenizer.

An ARM (or a reward model) ships a tokens file beside its graph (tokens.json, or a Hugging
Face tokenizer.json). Before anything runs, its token strings must equal the base GGUF's on
every id both list (`check_token_ids`: the first differing id is named), and the list must
cover the ids its graph scores (`check_arm_vocab`, once the graph is loaded). An ARM vocab
padded past the base's (32001 vs 32000) is fine: only the shared range is compared.
"""

from __future__ import annotations

from pathlib import Path

from .errors import BundleError, TokenizerMismatchError
from .gguf import vocab_fingerprint
from .manifest import is_int, read_json, show

MAX_VOCAB = 1 << 24  # token ids past this are a corrupt file, not a vocabulary

# kind -> (the export command that writes its tokens, what to do when its tokenizer differs)
_KINDS = {
    "ARM": (
        "`edge-genarm export arm`",
        "An ARM must share the base's token ids: train or export it from a model with the base's tokenizer",
    ),
    "reward model": (
        "`edge-genarm export rm`",
        "It scores the base's token ids, so train it from the base: `edge-genarm train-rm --init BASE.gguf "
        "--weights BUNDLE`, then `edge-genarm export rm`",
    ),
}


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
        data = read_json(path, f"ARM '{arm}': tokens file")
    except BundleError as e:
        raise TokenizerMismatchError(str(e).replace("re-export the bundle", "re-export the ARM")) from None
    if isinstance(data, list):
        if not data:
            raise bad("lists no tokens")
        if not all(isinstance(t, str) for t in data):
            i = next(i for i, t in enumerate(data) if not isinstance(t, str))
            raise bad(f"has {show(data[i])} at index {i}, not a token string")
        return data
    if not isinstance(data, dict):
        raise bad(f"holds {show(data)}")
    return _hf_tokens(data, bad)


def _hf_tokens(data: dict, bad) -> list[str]:
    """id -> token string of a tokenizer.json (model.vocab and added_tokens)."""
    model = data.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    added = data.get("added_tokens", [])
    if not isinstance(vocab, dict) or not isinstance(added, list):
        raise bad("has no model.vocab object")
    pairs = list(vocab.items()) + [
        (a.get("content"), a.get("id")) if isinstance(a, dict) else (None, None) for a in added
    ]
    for tok, i in pairs:
        if not isinstance(tok, str) or not is_int(i) or not 0 <= i < MAX_VOCAB:
            raise bad(f"maps {tok!r} to id {i!r} (ids are integers from 0 to {MAX_VOCAB - 1})")
    if not pairs:
        raise bad("lists no tokens")
    out = [""] * (max(i for _, i in pairs) + 1)
    for tok, i in pairs:
        out[i] = tok
    return out


def find_arm_tokens(onnx_path: Path) -> Path | None:
    """The tokens file beside an ARM graph: tokens.json, else tokenizer.json, else None."""
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


def check_token_ids(
    name: str,
    tokens: list[str] | None,
    base_tokens: list[str],
    base_name: str,
    kind: str = "ARM",
    fix: str | None = None,
) -> None:
    """The model's token strings equal the base's on the ids both list, else a
    TokenizerMismatchError naming the first differing id. `kind`: "ARM" or "reward model" (the
    wording and the fix); `fix` replaces the fix (e.g. when the user chose the base)."""
    export, default_fix = _KINDS[kind]
    if tokens is None:
        raise TokenizerMismatchError(
            f"{kind} '{name}' has no tokens.json or tokenizer.json beside it, so its token ids cannot "
            f"be checked against the base: export it with {export}"
        )
    n = min(len(tokens), len(base_tokens))
    if vocab_fingerprint(tokens, n) == vocab_fingerprint(base_tokens, n):
        return
    i = next(i for i in range(n) if tokens[i] != base_tokens[i])
    raise TokenizerMismatchError(
        f"{kind} '{name}' uses a different tokenizer from base '{base_name}': token id {i} is "
        f"{tokens[i]!r} in the {kind} but {base_tokens[i]!r} in the base. {fix or default_fix}"
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


def check_base_tokens(bundle, base_tokens: list[str]) -> None:
    """The base GGUF's vocabulary is the one the manifest of `bundle` (a bundle.Bundle) recorded
    (every ARM was checked against that one when it was exported)."""
    want = bundle.manifest["base"].get("tokenizer_fingerprint")
    if want is not None and vocab_fingerprint(base_tokens) != want:
        raise TokenizerMismatchError(
            f"base '{bundle.base_path}' has a different vocabulary ({len(base_tokens)} tokens) from the "
            f"one its manifest recorded (tokenizer_fingerprint {want[:12]}): the file was replaced; "
            "restore it or re-export the bundle"
        )
