"""Best-of-N and ARGS-k against direct recomputation, train-rm end to end, and bad input.

The reward model is the tiny fixture base with a random score head, exported by the real
exporter (optimum, compact graph) into a copy of the tiny bundle. References: the reward model
through Hugging Face's own `AutoModelForSequenceClassification` on the saved folder (a fresh
full forward of each whole sequence, no KV cache), the base through a second llama.cpp context
with logits for every position, the ARM through PyTorch on the weights it was exported from.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edge_genarm import guidance as G
from edge_genarm.baselines import (
    ArmScorer,
    RewardModel,
    args_decode,
    best_of_n,
    load_reward_model,
    sample_seed,
)
from edge_genarm.errors import ConfigError, ModelFileError, TokenizerMismatchError

from .reference import ref_distribution, ref_log_softmax

torch = pytest.importorskip("torch")

PROMPT = "Tell me about the sea."


@pytest.fixture(scope="module")
def rm_dir(tiny_root, tmp_path_factory):
    from edge_genarm.export.train_rm import save_untrained_rm

    return save_untrained_rm(tiny_root / "hf" / "base", tmp_path_factory.mktemp("rm") / "rm", seed=5)


@pytest.fixture(scope="module")
def rm_bundle(tiny_bundle, rm_dir, tmp_path_factory):
    from edge_genarm.export.rm_export import export_rm

    dst = tmp_path_factory.mktemp("rmb") / "bundle"
    shutil.copytree(tiny_bundle, dst)
    export_rm(rm_dir, dst, "tiny")
    return dst


@pytest.fixture(scope="module")
def rm_engine(rm_bundle):
    from edge_genarm import load

    e = load(str(rm_bundle), n_ctx=512)
    yield e
    e.close()


@pytest.fixture
def rm(rm_bundle):
    return load_reward_model(rm_bundle, threads=1)


@pytest.fixture(scope="module")
def ref(tiny_root, rm_dir):
    """Independent references: r(ids) by HF's sequence classifier, base and ARM logits."""
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    alpha = AutoModelForCausalLM.from_pretrained(tiny_root / "hf" / "alpha").eval()
    llm = llama_cpp.Llama(str(tiny_root / "bundle" / "base.gguf"), n_ctx=512, logits_all=True, verbose=False)

    def reward(ids):  # the score head on the last position's hidden state, one full forward
        with torch.no_grad():
            h = cls.model(torch.tensor([list(ids)])).last_hidden_state[0, -1]
            return float(cls.score(h)[0])

    def base_lp(ids):  # log p_base at the position after ids
        llm.reset()
        llm.eval(list(ids))
        return ref_log_softmax(np.array(llm.scores[len(ids) - 1], dtype=np.float64))

    def arm_reply_lp(prompt_ids, reply):
        with torch.no_grad():
            lp = torch.log_softmax(alpha(torch.tensor([prompt_ids + reply])).logits[0].double(), -1)
        return float(sum(lp[len(prompt_ids) - 1 + i, t] for i, t in enumerate(reply)))

    return reward, base_lp, arm_reply_lp


def prompt_ids(engine, prompt=PROMPT):
    return engine.tokenize_prompt(engine.format_prompt(prompt))


# ---------------------------------------------------------------------------
# the reward model's export
# ---------------------------------------------------------------------------


def test_rm_export_is_recorded_and_matches_pytorch_at_every_position(rm_bundle, rm, ref, rm_engine):
    reward = ref[0]
    m = json.loads((rm_bundle / "manifest.json").read_text())
    e = m["reward_models"]["tiny"]
    assert e["kind"] == "rm" and e["parity"]["passed"] and e["graph"] == "compact"
    assert "tiny" not in m["arms"]  # never loaded as an ARM
    assert all(f in m["files"] for f in (e["file"], e["tokens"]))
    ids = prompt_ids(rm_engine) + [300, 301, 302, 2]
    onnx_all = rm.graph.sequence_logits(ids)[:, 0]
    want = [reward(ids[: t + 1]) for t in range(len(ids))]
    np.testing.assert_allclose(onnx_all, want, atol=1e-4)
    assert np.std(want) > 0.05  # a real signal, not a constant
    from edge_genarm.export.commands import inspect_bundle

    assert "rm     tiny: reward_models/tiny/model.onnx" in inspect_bundle(rm_bundle)
    rm.graph.reset()
    assert rm.score(ids) == pytest.approx(want[-1], abs=1e-4)
    assert rm.score(ids[:-2]) == pytest.approx(want[-3], abs=1e-4)  # shorter: the cache is cut back


# ---------------------------------------------------------------------------
# ARGS-k
# ---------------------------------------------------------------------------


def check_steps(res, pids, ref, w, k):
    """Every step's candidates, log-probs and rewards against fresh full computations."""
    reward, base_lp = ref[0], ref[1]
    seq = list(pids)
    for s in res.steps:
        lp = base_lp(seq)
        top = np.argsort(-lp, kind="stable")[:k]
        assert list(s.candidates) == list(top)
        np.testing.assert_allclose(s.base_logprobs, lp[top], atol=2e-3)
        r = np.array([reward(seq + [int(c)]) for c in top])
        np.testing.assert_allclose(s.rewards, r, atol=1e-4)
        np.testing.assert_allclose(s.scores, lp[top] + w * r, atol=3e-3)
        seq.append(s.token)
        yield s, lp[top] + w * r


def test_args_greedy_picks_the_argmax_of_recomputed_scores(rm_engine, rm, ref):
    w, k = 4.0, 4
    res = args_decode(rm_engine, PROMPT, rm, k=k, w=w, seed=0, max_tokens=8, temperature=0)
    pids = prompt_ids(rm_engine)
    assert (
        len(res.steps) == 8 and res.tokens == [s.token for s in res.steps] and res.finish_reason == "length"
    )
    for s, scores in check_steps(res, pids, ref, w, k):
        assert s.token == int(s.candidates[np.argmax(scores)])
    assert any(s.token != s.candidates[0] for s in res.steps)  # the reward model changed the pick
    plain = args_decode(rm_engine, PROMPT, rm, k=k, w=0.0, seed=0, max_tokens=8, temperature=0)
    greedy = rm_engine.generate(PROMPT, max_tokens=8, temperature=0, guidance=False)
    assert plain.tokens == greedy.tokens and plain.text == greedy.text  # w = 0 is the base's greedy
    c = res.compute  # 1 prefill + k single steps per token; the base: 1 prefill + 7 steps
    assert (c.scorer_forwards, c.base_forwards, c.sampled) == (1 + k * 8, 8, 8)
    assert c.scorer_tokens == len(pids) + k * 8 and c.per_token(8)["scorer_forwards"] == (1 + k * 8) / 8
    assert c.scorer_prompt_tokens == len(pids) and c.base_tokens - c.base_prompt_tokens == 7


def test_args_sampling_draws_with_the_engine_sampler_conventions(rm_engine, rm, ref):
    w, k, seed = 2.0, 5, 11
    p = G.SamplingParams(temperature=0.9, top_k=40, top_p=0.9, min_p=0.05)
    res = args_decode(rm_engine, PROMPT, rm, k=k, w=w, seed=seed, max_tokens=6, sampling=p)
    rng = np.random.default_rng(seed)
    for s, scores in check_steps(res, prompt_ids(rm_engine), ref, w, k):
        q = ref_distribution(scores, p.temperature, p.top_k, p.top_p, p.min_p)
        order = np.argsort(-scores, kind="stable")
        cum = np.cumsum(q[order])
        j = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(order) - 1)
        assert s.token == int(s.candidates[order[j]])
    again = args_decode(rm_engine, PROMPT, rm, k=k, w=w, seed=seed, max_tokens=6, sampling=p)
    assert again.tokens == res.tokens


def test_args_stops_on_a_stop_string_and_leaves_the_engine_usable(rm_engine, rm):
    first = args_decode(rm_engine, PROMPT, rm, k=3, w=1.0, seed=0, max_tokens=10, temperature=0)
    stop = first.text[len(first.text) // 2 :][:3]
    assert stop.strip()
    res = args_decode(rm_engine, PROMPT, rm, k=3, w=1.0, seed=0, max_tokens=10, temperature=0, stop=[stop])
    assert res.finish_reason == "stop" and stop not in res.text and first.text.startswith(res.text)
    a = rm_engine.generate(PROMPT, max_tokens=5, seed=1)
    assert a.tokens == rm_engine.generate(PROMPT, max_tokens=5, seed=1).tokens


# ---------------------------------------------------------------------------
# Best-of-N
# ---------------------------------------------------------------------------


def test_best_of_n_with_the_reward_model(rm_engine, rm, ref, monkeypatch):
    reward = ref[0]
    calls = {"prefill": 0, "step": 0}
    for kind in calls:
        real = getattr(rm_engine.base, kind)
        monkeypatch.setattr(rm_engine.base, kind, lambda a, real=real, kind=kind: calls.__setitem__(
            kind, calls[kind] + 1) or real(a))  # fmt: skip
    res = best_of_n(rm_engine, PROMPT, 3, 7, rm, max_tokens=6, temperature=1.0)
    n_base_calls = calls["prefill"] + calls["step"]
    pids = prompt_ids(rm_engine)
    want = [reward(pids + s.tokens) for s in res.samples]  # none ended with EOS here
    assert all(s.finish_reason == "length" for s in res.samples)
    np.testing.assert_allclose(res.scores, want, atol=1e-4)
    assert res.index == int(np.argmax(want)) and res.tokens == res.samples[res.index].tokens
    assert res.text == res.samples[res.index].text
    assert len({tuple(s.tokens) for s in res.samples}) == 3  # three different seeds
    for i, s in enumerate(res.samples):  # each sample is exactly the unguided reply for its seed
        assert s.tokens == rm_engine.generate(PROMPT, max_tokens=6, temperature=1.0, seed=sample_seed(7, i),
                                              guidance=False).tokens  # fmt: skip
    assert res.seeds[0] == 7
    c = res.compute
    assert c.base_forwards == n_base_calls == 3 * 6 and c.scorer_forwards == 3
    assert c.sampled == 18 and c.base_tokens - c.base_prompt_tokens == 3 * 5
    assert c.scorer_prompt_tokens == len(pids) and c.scorer_tokens - c.scorer_prompt_tokens == 3 * 6


def test_best_of_n_with_an_arm_scores_the_summed_log_prob(rm_engine, ref):
    arm_lp = ref[2]
    res = best_of_n(rm_engine, PROMPT, 3, 2, "alpha", max_tokens=5)
    pids = prompt_ids(rm_engine)
    want = [arm_lp(pids, s.tokens) for s in res.samples]
    np.testing.assert_allclose(res.scores, want, atol=1e-3)
    assert res.index == int(np.argmax(want))
    # the prompt is cached: after the first sample only the reply (+ the last prompt token) is evaluated
    assert res.compute.scorer_tokens <= len(pids) + 3 * 6


def test_best_of_n_scores_a_finished_reply_with_its_eos(rm_engine, rm, ref, monkeypatch):
    """The tiny random base almost never samples EOS: make the 4th greedy token an end token."""
    from edge_genarm.backends.llama_base import LlamaBase

    greedy = rm_engine.generate(PROMPT, max_tokens=6, temperature=0, guidance=False).tokens
    end = greedy[3]
    assert end not in greedy[:3]
    monkeypatch.setattr(LlamaBase, "eos_ids", property(lambda self: {end}))
    res = best_of_n(rm_engine, PROMPT, 1, 0, rm, max_tokens=6, temperature=0)
    assert res.tokens == greedy[:3] and res.finish_reason == "stop"
    eos = int(rm_engine.base.info.get("tokenizer.ggml.eos_token_id"))  # what train-rm appends
    assert res.scores[0] == pytest.approx(ref[0](prompt_ids(rm_engine) + greedy[:3] + [eos]), abs=1e-4)
    assert res.compute.base_forwards == 4 and res.compute.sampled == 4  # prefill + 3 steps; EOS sampled


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, -1, 1.5, True, 10**9])
def test_bad_k_is_refused(rm_engine, rm, k):
    with pytest.raises(ConfigError, match="k must be"):
        args_decode(rm_engine, PROMPT, rm, k=k)


@pytest.mark.parametrize("n", [0, -2, 2.0, None])
def test_bad_n_is_refused(rm_engine, rm, n):
    with pytest.raises(ConfigError, match="n must be an integer >= 1"):
        best_of_n(rm_engine, PROMPT, n, 0, rm)


def test_other_bad_arguments_are_named(rm_engine, rm):
    with pytest.raises(ConfigError, match="weight w must be a finite number"):
        args_decode(rm_engine, PROMPT, rm, w=float("nan"))
    with pytest.raises(ConfigError, match="dry_multiplier=0"):
        args_decode(rm_engine, PROMPT, rm, repeat_penalty=1.1)
    with pytest.raises(ConfigError, match="needs a RewardModel"):
        args_decode(rm_engine, PROMPT, "alpha")
    with pytest.raises(ConfigError, match="unknown ARM 'nope'.*alpha, beta"):
        best_of_n(rm_engine, PROMPT, 2, 0, "nope")
    with pytest.raises(ConfigError, match="drop weights="):
        best_of_n(rm_engine, PROMPT, 2, 0, rm, weights={"alpha": 1.0})
    with pytest.raises(ConfigError, match="drop guidance="):
        best_of_n(rm_engine, PROMPT, 2, 0, ArmScorer(rm_engine, "alpha"), guidance=True)
    with pytest.raises(ConfigError, match="scorer must be an ARM name"):
        best_of_n(rm_engine, PROMPT, 2, 0, 3.5)


def test_reward_model_lookup_errors(tiny_bundle, rm_bundle):
    with pytest.raises(ConfigError, match="no reward model: train one with `edge-genarm train-rm`"):
        load_reward_model(tiny_bundle)
    with pytest.raises(ConfigError, match="unknown reward model 'x'.*tiny"):
        load_reward_model(rm_bundle, "x")
    with pytest.raises(ModelFileError, match="not a reward-model graph .*49152 values"):
        RewardModel(rm_bundle / "arms" / "alpha" / "model.onnx", cache=False)


def test_reward_model_with_another_tokenizer_is_refused_at_load(rm_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(rm_bundle, b)
    p = b / "reward_models" / "tiny" / "tokens.json"
    toks = json.loads(p.read_text())
    toks[200], toks[201] = toks[201], toks[200]
    p.write_text(json.dumps(toks))
    m = json.loads((b / "manifest.json").read_text())
    del m["files"]["reward_models/tiny/tokens.json"]
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        TokenizerMismatchError, match="reward model 'tiny' uses a different tokenizer.*token id 200.*train-rm"
    ):
        load_reward_model(b)


def test_reward_model_with_another_tokenizer_is_refused_at_export(rm_dir, rm_bundle, tmp_path):
    from edge_genarm.export.rm_export import export_rm

    d = tmp_path / "rm"
    shutil.copytree(rm_dir, d)
    spec = json.loads((d / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (300, 301))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (d / "tokenizer.json").write_text(json.dumps(spec))
    before = (rm_bundle / "manifest.json").read_text()
    with pytest.raises(TokenizerMismatchError, match="reward model 'other' .*token id 300"):
        export_rm(d, rm_bundle, "other")
    assert (rm_bundle / "manifest.json").read_text() == before


def test_a_plain_language_model_is_not_a_reward_model(tiny_root, rm_bundle):
    from edge_genarm.export.rm_export import export_rm
    from edge_genarm.export.sources import SourceError

    with pytest.raises(SourceError, match="is not a reward model.*train-rm"):
        export_rm(tiny_root / "hf" / "alpha", rm_bundle, "lm")
    with pytest.raises(ConfigError, match="reward model name"):
        export_rm(tiny_root / "hf" / "alpha", rm_bundle, "../x")


# ---------------------------------------------------------------------------
# train-rm end to end (CLI), then export with the quantization gate
# ---------------------------------------------------------------------------


def write_pairs(path, n=16):
    """Separable toy pairs: the same body, chosen ends ' yes', rejected ' no'."""
    import random

    r = random.Random(0)
    words = "apple river cloud stone lamp music garden window".split()
    with open(path, "w") as f:
        for i in range(n):
            body = " ".join(r.choice(words) for _ in range(3))
            f.write(
                json.dumps(
                    {"prompt": f"Say something {i}", "chosen": body + " yes", "rejected": body + " no"}
                )
                + "\n"
            )
    return path


def test_train_rm_end_to_end_records_heldout_accuracy(tiny_root, tiny_bundle, tmp_path):
    from click.testing import CliRunner
    from edge_genarm.export.gate import heldout_pairs
    from edge_genarm.export.train_rm import RM_INFO
    from transformers import AutoModelForSequenceClassification

    from edge_genarm.cli import main

    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "rm"
    args = ["train-rm", "--data", str(data), "--init", str(tiny_root / "hf" / "base"), "-o", str(out),
            "--weights", str(tiny_bundle), "--lora", "4", "--lora-layers", "1", "--epochs", "3",
            "--batch-size", "4", "--micro-batch", "4", "--eval-frac", "0.25", "--lr", "0.01"]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    info = json.loads((out / RM_INFO).read_text())
    assert info["n_heldout"] == 4 and info["n_train"] == 12 and info["steps"] == 9
    assert len(info["heldout_curve"]) == 2 and info["loss_end"] < info["loss_start"]
    # the recorded accuracy is what HF's own classifier on the saved folder gives on that split
    cls = AutoModelForSequenceClassification.from_pretrained(out).eval()
    held = heldout_pairs(tiny_bundle, data, 512, 0.25, 0)

    def r_of(ids):
        with torch.no_grad():
            return float(cls.score(cls.model(torch.tensor([ids])).last_hidden_state[0, -1])[0])

    acc = np.mean([r_of(p + w) > r_of(p + lo) for p, w, lo in held])
    assert info["heldout_accuracy"] == pytest.approx(acc)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "already holds a trained reward model" in r.output
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    r = CliRunner().invoke(
        main, ["export", "rm", str(out), "-o", str(b), "--name", "toy", "--quantize", "int8"]
    )
    assert r.exit_code == 0, r.output
    g = json.loads((b / "manifest.json").read_text())["reward_models"]["toy"]["gate"]
    assert g["pairs"] == 4 and g["accuracy_fp32"] == pytest.approx(acc) and g["passed"]
    assert load_reward_model(b, "toy", threads=1).graph.vocab_size == 1


def test_train_rm_bad_options_are_named(tiny_root, tmp_path):
    from edge_genarm.export.train_rm import train_rm

    data = write_pairs(tmp_path / "p.jsonl", n=4)
    with pytest.raises(ConfigError, match="--lora must be an integer >= 1"):
        train_rm(data, tiny_root / "hf" / "base", tmp_path / "o", lora_r=0, progress=False)
    with pytest.raises(ConfigError, match="--lora-layers must be between 1 and the model's 2 layers"):
        train_rm(data, tiny_root / "hf" / "base", tmp_path / "o", lora_layers=8, progress=False)


def test_baselines_run_without_torch(rm_bundle):
    import subprocess
    import sys

    code = f"""
import sys, json, edge_genarm
from edge_genarm.baselines import args_decode, best_of_n, load_reward_model
e = edge_genarm.load({str(rm_bundle)!r})
rm = load_reward_model({str(rm_bundle)!r}, threads=1)
args_decode(e, "Hi", rm, k=3, max_tokens=3, seed=0)
best_of_n(e, "Hi", 2, 0, rm, max_tokens=3)
best_of_n(e, "Hi", 2, 0, "alpha", max_tokens=3)
print(json.dumps([m for m in ("torch", "transformers", "optimum", "onnx") if m in sys.modules]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_eval_runs_args_and_best_of_n_from_the_bundle(rm_bundle, tmp_path):
    """`edge-genarm eval` loads the bundle's reward model for args:K and bon:N:rm; the records'
    replies equal a direct call with the same seed."""
    from click.testing import CliRunner

    from edge_genarm import evaluate as E
    from edge_genarm import load
    from edge_genarm.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n{"prompt": "Tell me a story"}\n')
    out = tmp_path / "ev"
    r = CliRunner().invoke(main, ["eval", "-m", str(rm_bundle), "--prompts", str(prompts), "--max-tokens", "5",
                                  "--method", "unguided", "--method", "args:3:0.5", "--method", "bon:2:rm",
                                  "--judge", "length", "-o", str(out), "--no-progress"])  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = (out / "records.jsonl").read_text().splitlines()
    recs = {(x["prompt_index"], x["method"]): x for x in map(json.loads, lines)}
    assert len(recs) == 6
    e = load(str(rm_bundle))
    rm_model = load_reward_model(str(rm_bundle))
    seed = E.seed_for(0, 1)
    e.reset()
    direct = args_decode(e, "Tell me a story", rm_model, k=3, w=0.5, seed=seed, max_tokens=5)
    assert recs[(1, "args:3:0.5")]["text"] == direct.text
    assert recs[(1, "args:3:0.5")]["forwards"] > recs[(1, "unguided")]["forwards"]  # k RM steps a token
    e.close()
