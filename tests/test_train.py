"""ARM training on a tiny random model: the loss formula, the mask, learning, bad inputs."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from edge_genarm.export.prefs import DataError
from edge_genarm.export.train import (
    IGNORE,
    build_sequence,
    collate,
    encode_pairs,
    genarm_loss,
    load_pairs,
    pair_rewards,
    parse_hh,
    prompt_ids,
    response_ids,
)
from edge_genarm.export.train_arm import ARM_INFO, train_arm
from edge_genarm.export.train_loop import prepare_model

from edge_genarm.errors import ConfigError, TokenizerMismatchError

WORDS = "apple river cloud stone lamp music garden window paper bridge".split()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from .tiny import build_tiny_hf

    return build_tiny_hf(tmp_path_factory.mktemp("train") / "hf", seed=3)


@pytest.fixture(scope="module")
def model_tok(tiny_hf):
    return prepare_model(tiny_hf, None, None, "cpu")


def write_pairs(path, n=24, seed=0):
    """Separable toy set: chosen and rejected share a body; chosen ends 'yes', rejected 'no'."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            body = " ".join(r.choice(WORDS) for _ in range(3))
            rec = {"prompt": f"Say something {i}", "chosen": body + " yes", "rejected": body + " no"}
            f.write(json.dumps(rec) + "\n")
    return path


def direct_reward(model, p, r):
    """Independent r(x, y): one unpadded forward, log_softmax, gather, sum over response positions."""
    import torch

    ids = torch.tensor([p + r])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    tok_lp = logp[:-1].gather(1, ids[0, 1:, None])[:, 0]  # position t predicts token t+1
    return tok_lp[len(p) - 1 :].sum()


def test_loss_matches_direct_formula(model_tok, tmp_path):
    import torch

    model, tok = model_tok
    enc = encode_pairs(tok, load_pairs(write_pairs(tmp_path / "p.jsonl", n=3)))
    enc[1] = (enc[1][0], enc[1][1] + [42, 43, 44], enc[1][2])  # unequal lengths: padding matters
    with torch.no_grad():
        r_w, r_l = pair_rewards(model, enc, tok.eos_token_id, "cpu")
        loss = genarm_loss(r_w, r_l, 0.05)
    for i, (p, w, lo) in enumerate(enc):
        dw, dl = direct_reward(model, p, w), direct_reward(model, p, lo)
        assert torch.allclose(r_w[i], dw, atol=1e-3) and torch.allclose(r_l[i], dl, atol=1e-3)
        expected = -torch.log(torch.sigmoid(0.05 * (dw - dl)))
        assert torch.allclose(loss[i], expected, atol=1e-5)


def test_mask_covers_only_response_tokens(model_tok):
    model, tok = model_tok
    p, r = prompt_ids(tok, "hi"), response_ids(tok, "Hello there")
    text = tok.decode(p)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert r[-1] == tok.eos_token_id and tok.decode(r[:-1]) == "Hello there"
    ids, labels = build_sequence(p, r)
    assert labels[: len(p)] == [IGNORE] * len(p) and labels[len(p) :] == r and ids == p + r
    x, mask, y = collate([(ids, labels), (p + r[:1], labels[: len(p) + 1])], pad_id=0)
    assert y[1, len(p) + 1 :].eq(IGNORE).all() and mask[1].sum() == len(p) + 1
    assert (y != IGNORE).sum() == len(r) + 1  # only response tokens are scored


def test_cut_responses_get_no_eos(model_tok, tmp_path):
    _, tok = model_tok
    rec = {
        "prompt": "p",
        "chosen": "a b",
        "rejected": "c d",
        "finish": {"chosen": "stop", "rejected": "length"},
    }
    (tmp_path / "f.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "finish": {"chosen": "?"}}))
    with pytest.raises(DataError, match='line 2: "finish" must map'):
        load_pairs(tmp_path / "f.jsonl")
    (pair,) = load_pairs(tmp_path / "f.jsonl", on_error="skip")
    assert pair.finished == (True, False)
    _, w, lo = encode_pairs(tok, [pair])[0]
    assert w[-1] == tok.eos_token_id and lo == tok("c d", add_special_tokens=False).input_ids


def test_lora_on_the_last_layers_only(tiny_hf):
    model, _ = prepare_model(tiny_hf, None, 4, "cpu", "attn", lora_layers=1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in n for n in trainable)  # tiny model: layers 0 and 1
    with pytest.raises(ConfigError, match="--lora-layers must be between 1 and the model's 2 layers"):
        prepare_model(tiny_hf, None, 4, "cpu", "attn", lora_layers=3)


def test_adapter_reproduces_the_trained_arm(tiny_hf, tmp_path):
    import torch
    from edge_genarm.export.train_arm import apply_adapter
    from transformers import AutoModelForCausalLM

    data = write_pairs(tmp_path / "pairs.jsonl", n=8)
    out = tmp_path / "arm"
    train_arm(data, tiny_hf, out, beta_r=0.5, lora_r=4, lora_layers=1, lr=5e-2, batch_size=4, eval_frac=0,
              progress=False)  # fmt: skip
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    again = apply_adapter(tiny_hf, out / "adapter", tmp_path / "again")
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        a, b, base = (AutoModelForCausalLM.from_pretrained(d)(ids).logits for d in (out, again, tiny_hf))
    assert (a - base).abs().max() > 1e-2  # training moved the ARM away from its init...
    assert torch.allclose(a, b, atol=2e-3)  # ...and the float16 adapter puts it back


def test_training_learns_a_separable_set_and_exports(tiny_hf, tmp_path, bundle_copy):
    data = write_pairs(tmp_path / "pairs.jsonl", n=24)
    out = tmp_path / "arm"
    info = train_arm(data, tiny_hf, out, beta_r=0.5, lr=5e-3, epochs=3, batch_size=8, micro_batch=8,
                     eval_frac=0.25, weights=bundle_copy, progress=False)  # fmt: skip
    assert info["loss_end"] < info["loss_start"]
    assert info["heldout_accuracy"] == 1.0 and info["heldout_margin"] > 0 and info["n_heldout"] == 6
    saved = json.loads((out / ARM_INFO).read_text())
    assert saved["beta_r"] == 0.5 and saved["layers"] == 2 and saved["steps"] == 7  # ceil(18 * 3 / 8)
    assert (out / "model.safetensors").is_file() and not (out / "checkpoint").exists()
    from edge_genarm.export.commands import export_arm

    m = export_arm(out, bundle_copy, "yes", beta_r=0.5)
    assert m["arms"]["yes"]["parity"]["passed"]
    with pytest.raises(ConfigError, match="already holds a trained ARM"):
        train_arm(data, tiny_hf, out, progress=False)


def test_resume_from_checkpoint_matches_uninterrupted(tiny_hf, tmp_path, monkeypatch, capsys):
    import edge_genarm.export.train_loop as tl

    data = write_pairs(tmp_path / "pairs.jsonl", n=16)
    kw = dict(beta_r=0.5, lr=5e-3, batch_size=4, micro_batch=4, eval_frac=0.25, save_every=1, progress=False)
    whole = train_arm(data, tiny_hf, tmp_path / "a", **kw)
    real, calls = tl.accumulate, []

    def dies_at_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tl, "accumulate", dies_at_third)
    with pytest.raises(KeyboardInterrupt):
        train_arm(data, tiny_hf, tmp_path / "b", **kw)
    assert (tmp_path / "b" / "checkpoint" / "state.pt").is_file()
    monkeypatch.setattr(tl, "accumulate", real)
    resumed = train_arm(data, tiny_hf, tmp_path / "b", **kw)
    assert "resuming from" in capsys.readouterr().err
    assert resumed["heldout_margin"] == pytest.approx(whole["heldout_margin"], abs=1e-3)
    with pytest.raises(KeyboardInterrupt):  # a checkpoint of other settings is refused, not mixed in
        monkeypatch.setattr(tl, "accumulate", dies_at_third)
        calls.clear()
        train_arm(data, tiny_hf, tmp_path / "c", **kw)
    with pytest.raises(ConfigError, match="other settings"):
        train_arm(data, tiny_hf, tmp_path / "c", **{**kw, "beta_r": 0.1})


def test_reference_scores_replies_relative_to_the_init(tiny_hf, bundle_copy, tmp_path, capsys):
    """Length pairs the init already ranks right: the plain loss starts saturated, the relative
    one at log 2, and its offsets are the init's own margins (recomputed here directly). The
    export gate then scores the ARM as training did: relative to the recorded margins."""
    import math

    from edge_genarm.export import commands
    from edge_genarm.export.gate import RELATIVE, gate, heldout_pairs
    from edge_genarm.export.share import PairSpec
    from edge_genarm.export.train import with_reference
    from edge_genarm.export.train_loop import split

    from edge_genarm.backends.onnx_arm import OnnxARM

    r = random.Random(1)
    with open(tmp_path / "len.jsonl", "w") as f:
        for i in range(16):
            body = " ".join(r.choice(WORDS) for _ in range(3))
            tail = " ".join(r.choice(WORDS) for _ in range(12))
            f.write(json.dumps({"prompt": f"Say {i}", "chosen": body, "rejected": body + " " + tail}) + "\n")
    model, tok = prepare_model(tiny_hf, None, 4, "cpu", "all")
    enc = encode_pairs(tok, load_pairs(tmp_path / "len.jsonl"))
    rel = with_reference(model, enc, tok.eos_token_id, "cpu", 4)
    base, _ = prepare_model(tiny_hf, None, None, "cpu")
    for (p, w, lo), e in zip(enc, rel):
        assert e[:3] == (p, w, lo)
        assert e[3] == pytest.approx(float(direct_reward(base, p, w) - direct_reward(base, p, lo)), abs=1e-3)
    assert min(e[3] for e in rel) > 10  # the init already prefers the short reply by a wide margin
    kw = dict(beta_r=0.5, lora_r=4, lr=2e-2, epochs=3, batch_size=4, micro_batch=4, eval_frac=0.25, progress=False)
    plain = train_arm(tmp_path / "len.jsonl", tiny_hf, tmp_path / "plain", **kw)
    assert plain["loss_start"] < 1e-3  # nothing to learn from
    ref = train_arm(tmp_path / "len.jsonl", tiny_hf, tmp_path / "ref", reference=True, **kw)
    assert ref["loss_start"] == pytest.approx(math.log(2), abs=0.02)
    assert ref["loss_end"] < ref["loss_start"] - 0.1 and ref["heldout_margin"] > 0
    assert abs(ref["heldout_margin_before"]) < 1e-2 and ref["reward"] == "relative to the init"
    assert ref["heldout_accuracy"] >= 0.75  # beyond the init's margin, on pairs it never saw
    held = split(len(rel), 0.25, 0)[1]
    assert ref["heldout_reference_margins"] == pytest.approx([rel[i][3] for i in held], abs=1e-4)
    # the quantization gate: fp32 ONNX accuracy relative to the init = train-arm's own figure
    spec = PairSpec(tmp_path / "len.jsonl", 512, 0.25, 0)
    m = commands.export_arm(tmp_path / "ref", bundle_copy, "short", 0.5, quantize="int8", pairs=spec)
    g = m["arms"]["short"]["gate"]
    assert g["reward"] == RELATIVE and g["pairs"] == len(held)
    assert g["accuracy_fp32"] == pytest.approx(ref["heldout_accuracy"])
    # margins shifted to the median of the ARM's own relative margins (torch, on the trained
    # folder): half the pairs fall below, and the gate on the ONNX graph must count just those
    arm, _ = prepare_model(tmp_path / "ref", None, None, "cpu")
    own = [float(direct_reward(arm, *rel[i][:2]) - direct_reward(arm, rel[i][0], rel[i][2])) for i in held]
    beyond = [o - r for o, r in zip(own, ref["heldout_reference_margins"])]
    mid = float(np.median(beyond))
    doctored = dict(ref, heldout_reference_margins=[r + mid for r in ref["heldout_reference_margins"]])
    want = np.mean([b > mid for b in beyond])
    assert 0 < want < 1
    onnx = OnnxARM(bundle_copy / m["arms"]["short"]["file"], "short", cache=False)
    seqs = heldout_pairs(bundle_copy, spec.data, 512, 0.25, 0, doctored)
    assert gate(onnx.sequence_logits, onnx.sequence_logits, seqs)["accuracy_fp32"] == pytest.approx(want)
    assert f"accuracy ({RELATIVE})" in capsys.readouterr().err
    raw = heldout_pairs(bundle_copy, spec.data, 512, 0.25, 0)  # the plain ARM's record: no margins
    assert all(len(e) == 3 for e in raw)
    assert [e[:3] for e in heldout_pairs(bundle_copy, spec.data, 512, 0.25, 0, ref)] == raw
    short = dict(ref, heldout_reference_margins=ref["heldout_reference_margins"][:-1])
    assert heldout_pairs(bundle_copy, spec.data, 512, 0.25, 0, short) == raw  # another split: raw, and said
    assert "scores raw summed log-probs" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--reference needs LoRA"):
        train_arm(tmp_path / "len.jsonl", tiny_hf, tmp_path / "full", reference=True, lora_r=None, progress=False)


# ---------------------------------------------------------------------------
# pair files and bad input
# ---------------------------------------------------------------------------


def test_hh_transcripts_split_at_last_assistant_turn(tmp_path):
    t = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: "
    msgs, resp = parse_hh(t + "Why did the chicken...")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"] and msgs[2][
        "content"
    ] == "Tell me a joke"
    assert resp == "Why did the chicken..."
    (tmp_path / "hh.jsonl").write_text(json.dumps({"chosen": t + "Sure.", "rejected": t + "No."}) + "\n")
    [pair] = load_pairs(tmp_path / "hh.jsonl")
    assert pair.prompt == msgs and (pair.chosen, pair.rejected) == ("Sure.", "No.")


def test_malformed_lines_report_the_line_number(tmp_path):
    f = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    f.write_text(good + "\n" + good + "\n{not json\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 3: .*--on-error skip"):
        load_pairs(f)
    stats = {}
    assert len(load_pairs(f, "skip", stats)) == 2 and stats["bad_lines"] == 2


def test_empty_response_is_refused(tmp_path):
    f = tmp_path / "e.jsonl"
    f.write_text(json.dumps({"prompt": "p", "chosen": "  ", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r'line 1: "chosen" response is empty'):
        load_pairs(f)


def test_long_pairs_are_truncated_or_skipped_and_counted(model_tok, tmp_path):
    _, tok = model_tok
    f = tmp_path / "long.jsonl"
    recs = [
        {"prompt": "p", "chosen": "a " * 200, "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    n_prompt = len(prompt_ids(tok, "p"))
    stats = {}
    enc = encode_pairs(tok, load_pairs(f), max_len=n_prompt + 10, on_long="truncate", stats=stats)
    assert stats["truncated"] == 1 and len(enc) == 2 and len(enc[0][1]) == 10
    enc = encode_pairs(tok, load_pairs(f), max_len=n_prompt + 10, on_long="skip", stats=stats)
    assert stats["skipped_long"] == 1 and len(enc) == 1
    with pytest.raises(DataError, match="raise --max-len"):
        encode_pairs(tok, load_pairs(f), max_len=n_prompt, on_long="truncate")


def test_init_with_another_tokenizer_is_refused(tiny_hf, tmp_path, smollm2_gguf):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_hf, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (300, 301))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    data = write_pairs(tmp_path / "p.jsonl", n=4)
    with pytest.raises(TokenizerMismatchError, match="token id 300"):
        train_arm(data, other, tmp_path / "arm", weights=smollm2_gguf, progress=False)


def test_cli_train_arm_reports_bad_data(tmp_path):
    from click.testing import CliRunner

    from edge_genarm.cli import main

    f = tmp_path / "bad.jsonl"
    f.write_text("{oops\n")
    r = CliRunner().invoke(
        main, ["train-arm", "--data", str(f), "--init", str(tmp_path), "-o", str(tmp_path / "o")]
    )
    assert r.exit_code == 1 and "bad.jsonl line 1" in r.output
    r = CliRunner().invoke(
        main, ["train-arm", "--data", str(f), "--init", str(tmp_path), "-o", "x", "--beta-r", "0"]
    )
    assert r.exit_code == 1 and "--beta-r must be > 0" in r.output


def test_adapter_folder_without_config_is_named(tiny_hf, tmp_path):
    from edge_genarm.export.train_arm import apply_adapter

    (tmp_path / "adapter").mkdir()
    with pytest.raises(ConfigError, match="is not a LoRA adapter folder .*retrain it"):
        apply_adapter(tiny_hf, tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()
