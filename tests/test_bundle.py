"""Bad input: every broken file or value gets an error naming the thing and the fix."""

import json
import shutil

import numpy as np
import pytest
from edge_genarm.export.bundle_write import add_arm

from edge_genarm import load
from edge_genarm.bundle import Bundle, parse_arm_spec
from edge_genarm.errors import (
    BundleError,
    ConfigError,
    ContextOverflowError,
    ModelFileError,
    TokenizerMismatchError,
)
from edge_genarm.gguf import read_gguf


def test_bundle_loads_and_lists_arms(tiny_bundle):
    b = Bundle.open(tiny_bundle)
    assert set(b.arms) == {"alpha", "beta"} and b.arms["alpha"].beta_r == 0.1


def test_missing_folder_and_missing_manifest(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.open(tmp_path / "nope")
    with pytest.raises(BundleError, match="no manifest.json.*export base"):
        Bundle.open(tmp_path)


def test_corrupt_manifest(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(bundle_copy)


def test_missing_arm_file(bundle_copy):
    (bundle_copy / "arms" / "beta" / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing 'arms/beta/model.onnx'"):
        Bundle.open(bundle_copy)


def test_truncated_gguf_is_caught_by_size_and_by_the_reader(bundle_copy, tmp_path):
    gg = bundle_copy / "base.gguf"
    data = gg.read_bytes()
    gg.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated"):
        Bundle.open(bundle_copy)
    loose = tmp_path / "half.gguf"
    loose.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        read_gguf(loose)
    with pytest.raises(ModelFileError, match="truncated"):  # as a bare .gguf: never a process abort
        load(str(loose))


def test_garbage_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGML" + b"\0" * 100)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        load(str(p))
    p.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (1 << 40).to_bytes(8, "little") + b"\0" * 8)
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        read_gguf(p)


def test_gguf_whose_vocab_llama_cpp_rejects_is_caught_in_a_child(bundle_copy, tmp_path):
    """A header that parses but that llama.cpp would choke on: the probe runs it elsewhere."""
    src = (bundle_copy / "base.gguf").read_bytes()
    bad = src.replace(
        b"tokenizer.ggml.model\x08\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00gpt2",
        b"tokenizer.ggml.model\x08\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00zzzz",
    )
    assert bad != src
    p = tmp_path / "badvocab.gguf"
    p.write_bytes(bad)
    with pytest.raises(ModelFileError, match="llama.cpp cannot load"):
        load(str(p))


def test_changed_file_fails_the_hash_check(bundle_copy):
    p = bundle_copy / "arms" / "alpha" / "tokens.json"
    data = bytearray(p.read_bytes())
    data[10] = ord("X") if data[10] != ord("X") else ord("Y")
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(bundle_copy)


def test_corrupt_onnx_is_a_clear_error(tiny_bundle, tmp_path):
    dst = tmp_path / "broken"
    shutil.copytree(tiny_bundle / "arms" / "alpha", dst)
    p = dst / "model.onnx"
    p.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="ARM 'broken'.*cannot load ONNX"):
        load(str(tiny_bundle), [f"{p}=1"])


def _retokenize(bundle, name, mutate):
    p = bundle / "arms" / name / "tokens.json"
    toks = json.loads(p.read_text())
    toks = mutate(toks)
    p.write_text(json.dumps(toks))
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"].pop(f"arms/{name}/tokens.json", None)
    (bundle / "manifest.json").write_text(json.dumps(m))


def test_tokenizer_mismatch_is_refused_with_the_differing_id(bundle_copy):
    def swap(t):
        t[100], t[101] = t[101], t[100]
        return t

    _retokenize(bundle_copy, "beta", swap)
    with pytest.raises(TokenizerMismatchError, match="ARM 'beta'.*token id 100"):
        load(str(bundle_copy), ["beta=1"])


def _pad_graph_vocab(bundle, name, extra):
    """The ARM's LM head scores `extra` more ids than the base has (as 32001 vs 32000 in real models)."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    p = bundle / "arms" / name / "model.onnx"
    model = onnx.load(str(p))
    for init in model.graph.initializer:  # the LM head: [hidden, vocab]
        if len(init.dims) == 2 and init.dims[1] == 49152 and init.dims[0] != 49152:
            w = numpy_helper.to_array(init)
            w = np.concatenate([w, np.zeros((w.shape[0], extra), w.dtype)], axis=1)
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    for o in model.graph.output:
        if o.name == "logits":
            o.type.tensor_type.shape.dim[2].dim_value = 49152 + extra
    onnx.save(model, str(p))
    m = json.loads((bundle / "manifest.json").read_text())
    del m["files"][f"arms/{name}/model.onnx"]
    (bundle / "manifest.json").write_text(json.dumps(m))


def test_padded_arm_vocab_is_accepted_on_the_shared_range(bundle_copy):
    _pad_graph_vocab(bundle_copy, "beta", 1)
    _retokenize(bundle_copy, "beta", lambda t: t + ["<pad>"])
    e = load(str(bundle_copy), ["beta=1"])
    assert e.arms["beta"].vocab_size == 49153 and e.generate("Hi", max_tokens=3, seed=0).tokens


def test_tokens_that_do_not_match_the_graph_are_refused(bundle_copy):
    _retokenize(bundle_copy, "beta", lambda t: t + ["<pad>"])  # 49153 tokens, the graph scores 49152
    with pytest.raises(TokenizerMismatchError, match="lists 49153 tokens.*scores only 49152"):
        load(str(bundle_copy), ["beta=1"])
    _retokenize(bundle_copy, "beta", lambda t: t[:-2])  # ids 49151, 49152 of the shared range unchecked
    with pytest.raises(TokenizerMismatchError, match="lists 49151 tokens.*ids 49151 to 49151"):
        load(str(bundle_copy), ["beta=1"])


def test_exporting_a_mismatched_arm_into_a_bundle_is_refused(tiny_root, tmp_path):
    src = tmp_path / "arm"
    shutil.copytree(tiny_root / "bundle" / "arms" / "alpha", src)
    toks = json.loads((src / "tokens.json").read_text())
    toks[7] = "something-else"
    (src / "tokens.json").write_text(json.dumps(toks))
    dst = tmp_path / "b"
    shutil.copytree(tiny_root / "bundle", dst)
    with pytest.raises(TokenizerMismatchError, match="token id 7"):
        add_arm(dst, src, "gamma")


def test_arm_specs():
    assert parse_arm_spec("positive=1.5") == ("positive", 1.5)
    assert parse_arm_spec("positive") == ("positive", None)
    assert parse_arm_spec("dir/a=b.onnx=-0.5") == ("dir/a=b.onnx", -0.5)
    with pytest.raises(ConfigError, match="weight for 'positive' must be a number, got 'lots'"):
        parse_arm_spec("positive=lots")
    with pytest.raises(ConfigError, match="finite"):
        parse_arm_spec("positive=nan")


def test_unknown_arm_names_the_available_ones(tiny_bundle, engine):
    with pytest.raises(ConfigError, match="unknown ARM 'kind'.*alpha, beta"):
        load(str(tiny_bundle), ["kind=1"])
    with pytest.raises(ConfigError, match="unknown ARM 'kind'"):
        engine.set_weights({"kind": 1.0})
    with pytest.raises(ConfigError, match="finite number"):
        engine.set_weights({"alpha": "x"})


def test_prompt_longer_than_the_context(tiny_bundle):
    e = load(str(tiny_bundle), [], n_ctx=256)
    n = e.base.n_ctx
    with pytest.raises(ContextOverflowError, match=f"prompt is .* tokens but the context holds {n}"):
        e.generate("word " * 400)
    c = e.generate("Hi", max_tokens=1000, seed=0, ignore_eos=True)  # clamped to the room left
    assert c.finish_reason == "length" and len(c.tokens) == n - len(e.tokenize_prompt(e.format_prompt("Hi")))


def test_nan_logits_from_an_arm_fall_back_with_a_warning(tiny_bundle, tmp_path, caplog):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    src = tiny_bundle / "arms" / "alpha"
    dst = tmp_path / "nanarm"
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    for init in model.graph.initializer:  # the LM head: [hidden, vocab]
        if len(init.dims) == 2 and init.dims[1] == 49152 and init.dims[0] != 49152:
            init.CopyFrom(
                numpy_helper.from_array(np.full_like(numpy_helper.to_array(init), np.nan), init.name)
            )
            break
    else:
        pytest.fail("no final norm weight found in the ONNX graph")
    onnx.save(model, str(dst / "model.onnx"))
    e = load(str(tiny_bundle), [f"{dst / 'model.onnx'}=1.0"])
    with caplog.at_level("WARNING"):
        c = e.generate("Hi", max_tokens=4, seed=0)
    assert all(r.fallback == ["nanarm"] for r in c.records)
    assert all(np.isfinite(r.combined_logprob) for r in c.records)
    assert "NaN/inf" in caplog.text
