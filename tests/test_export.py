"""Export end to end on tiny Hugging Face models, and its bad inputs."""

import json
import shutil

import pytest
from click.testing import CliRunner
from edge_genarm.export.bundle_write import tidy_bundle

from edge_genarm import load
from edge_genarm.bundle import Bundle
from edge_genarm.cli import main
from edge_genarm.errors import BundleError, TokenizerMismatchError

pytest.importorskip("torch")
from edge_genarm.export import commands  # noqa: E402
from edge_genarm.export.sources import SourceError, check_hf_dir  # noqa: E402


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def exported(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "bundle"
    r = cli("export", "base", tiny_root / "hf" / "base", "-o", out, "--quant", "f32")
    assert r.exit_code == 0, r.output
    r = cli("export", "arm", tiny_root / "hf" / "alpha", "-o", out, "--name", "alpha", "--beta-r", "0.1")
    assert r.exit_code == 0, r.output
    return out


def test_export_then_generate(exported):
    m = json.loads((exported / "manifest.json").read_text())
    assert m["base"]["parity"]["passed"] and m["base"]["parity"]["top1_agreement"] == 1.0
    assert m["arms"]["alpha"]["parity"]["max_abs_logit_diff"] < 1e-3 and m["arms"]["alpha"]["beta_r"] == 0.1
    e = load(str(exported), ["alpha=1.0"])
    assert e.generate("Hello", max_tokens=4, seed=0).tokens


def test_inspect_lists_everything(exported):
    r = cli("bundle", "inspect", exported)
    assert r.exit_code == 0, r.output
    for s in (
        "vocab 49152",
        "chat template: yes",
        "arm    alpha",
        "beta_r 0.1",
        "parity: top-1 1.000",
        "sha256",
    ):
        assert s in r.output


def test_rerun_skips_and_different_base_is_refused(exported, tiny_root, tmp_path):
    r = CliRunner().invoke(
        main, ["export", "arm", str(tiny_root / "hf" / "alpha"), "-o", str(exported), "--name", "alpha"]
    )
    assert r.exit_code == 0 and "skipping" in r.output
    other = tmp_path / "otherbase"
    shutil.copytree(tiny_root / "hf" / "beta", other)
    r = cli("export", "base", other, "-o", exported)
    assert r.exit_code != 0 and "already holds a different bundle" in r.output


def test_interrupted_export_leaves_no_valid_bundle_and_resumes(tiny_root, tmp_path, monkeypatch):
    out = tmp_path / "b"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "run_parity", boom)
    with pytest.raises(KeyboardInterrupt):
        commands.export_base(tiny_root / "hf" / "base", out, "f32")
    with pytest.raises(BundleError):
        Bundle.open(out)
    monkeypatch.undo()
    commands.export_base(tiny_root / "hf" / "base", out, "f32")
    assert Bundle.open(out).base_path.is_file()
    assert not list(out.glob("*.partial")) and not list(out.glob("tmp*"))


def test_export_killed_inside_the_manifest_write_resumes(exported, tmp_path):
    """SIGKILL between the manifest's temporary file and its rename leaves base.gguf and
    .manifest.json.*.tmp: the rerun takes the folder as its own, and tidying deletes the leftover."""
    out = tmp_path / "b"
    out.mkdir()
    gguf = Bundle.open(exported).base_path
    shutil.copyfile(gguf, out / "base.gguf")
    (out / ".manifest.json.k1ll3d.tmp").write_text('{"base": {"fi')
    commands.export_base(gguf, out)
    assert Bundle.open(out).base_path.is_file()
    assert tidy_bundle(out) == [out / ".manifest.json.k1ll3d.tmp"] and not list(out.glob(".*.tmp"))
    (out / "notes.txt").write_text("mine")  # anything else is still refused
    shutil.rmtree(tmp_path / "c", ignore_errors=True)
    shutil.copytree(out, tmp_path / "c")
    (tmp_path / "c" / "manifest.json").unlink()
    with pytest.raises(BundleError, match="not an edge-genarm bundle"):
        commands.export_base(gguf, tmp_path / "c")


def test_source_folder_problems_are_named(tiny_root, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_root / "hf" / "alpha", d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"model_type": "bert"}))
    with pytest.raises(SourceError, match="'bert' model.*supported architectures"):
        check_hf_dir(d)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer.json").unlink()
    with pytest.raises(SourceError, match="no tokenizer"):
        check_hf_dir(d)
    for p in d.glob("*.safetensors"):
        p.unlink()
    with pytest.raises(SourceError, match="no weights"):
        check_hf_dir(d)
    r = cli("export", "arm", d, "-o", tmp_path, "--name", "x")
    assert r.exit_code != 0 and "no bundle yet" in r.output


def test_arm_with_a_different_tokenizer_is_refused_before_export(exported, tiny_root, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_root / "hf" / "beta", d)
    tj = json.loads((d / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = "hello", "world"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(TokenizerMismatchError, match="ARM 'beta2' uses a different tokenizer"):
        commands.export_arm(d, exported, "beta2", 0.1)
    assert "beta2" not in json.loads((exported / "manifest.json").read_text())["arms"]


def test_large_arms_get_external_data_with_identical_logits(tiny_bundle, tmp_path):
    import numpy as np
    from edge_genarm.export.onnx_export import _externalize

    from edge_genarm.backends.onnx_arm import OnnxARM

    src = tiny_bundle / "arms" / "alpha" / "model.onnx"
    dst = tmp_path / "model.onnx"
    shutil.copyfile(src, dst)
    _externalize(dst, threshold=0)
    assert (tmp_path / "model.onnx_data").stat().st_size > dst.stat().st_size
    ids = [1, 4093, 198, 19556]
    a, b = OnnxARM(src, "a"), OnnxARM(dst, "b")
    np.testing.assert_array_equal(a.prefill(ids), b.prefill(ids))


@pytest.mark.parametrize("kind,ratio", [("int8", 0.75), ("int4", 0.4)])
def test_quantized_arm_is_smaller_and_its_drift_is_recorded(exported, tiny_root, kind, ratio):
    name = f"beta{kind}"
    r = cli("export", "arm", tiny_root / "hf" / "beta", "-o", exported, "--name", name, "--quantize", kind)
    assert r.exit_code == 0, r.output
    m = json.loads((exported / "manifest.json").read_text())
    p, g = m["arms"][name]["parity"], m["arms"][name]["gate"]
    assert p["type"] == kind and p["passed"] and 0 < p["mean_kl"] and p["max_abs_logit_diff"] > 1e-4
    assert (
        g["type"] == kind and g["mean_kl"] > 0 and g["pairs"] == 0
    )  # no --pairs: KL/top-1 against fp32 only
    # int8 keeps the fp32 embedding (onnxruntime quantizes Gather to 4 bits only), int4 quantizes it too
    f32 = (exported / "arms" / "alpha" / "model.onnx").stat().st_size
    assert (exported / "arms" / name / "model.onnx").stat().st_size < f32 * ratio
    assert load(str(exported), [f"{name}=1"]).generate("Hi", max_tokens=3, seed=0).tokens


def test_optimized_graph_cache_gives_the_same_logits(tiny_bundle, tmp_path, monkeypatch):
    import os

    import numpy as np

    from edge_genarm.backends import onnx_arm
    from edge_genarm.backends.onnx_arm import OnnxARM, optimized_cache_path

    src = tmp_path / "model.onnx"
    shutil.copyfile(tiny_bundle / "arms" / "alpha" / "model.onnx", src)
    ids = [1, 4093, 198, 19556]
    plain = OnnxARM(src, "plain").prefill(ids)
    monkeypatch.setenv("EDGE_GENARM_ORT_CACHE", "1")
    monkeypatch.setenv("EDGE_GENARM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_arm, "CACHE_MIN_SECONDS", 0.0)  # the tiny ARM optimizes in no time
    monkeypatch.setattr(onnx_arm, "CACHE_READ_BYTES_PER_S", float("inf"))
    first = OnnxARM(src, "a")
    cached = optimized_cache_path(src)
    assert not first.from_cache and cached.is_file()
    second = OnnxARM(src, "b")
    assert second.from_cache
    np.testing.assert_allclose(second.prefill(ids), plain, atol=1e-4)
    np.testing.assert_allclose(second.step(7), first.prefill(ids + [7]), atol=1e-4)
    cached.write_bytes(b"torn")  # an unreadable entry is dropped and rebuilt, not an error
    third = OnnxARM(src, "c")
    assert not third.from_cache and cached.stat().st_size > 100
    os.utime(src, ns=(1, 1))  # the ARM file changed: a new entry replaces the old one
    OnnxARM(src, "d")
    new = optimized_cache_path(src)
    assert new != cached and sorted(cached.parent.iterdir()) == [new, new.with_name(new.name + ".data")]
    assert not OnnxARM(src, "e", cache=False).from_cache


def test_a_graph_that_optimizes_fast_is_not_copied_into_the_cache(tiny_bundle, tmp_path, monkeypatch):
    from edge_genarm.backends import onnx_arm
    from edge_genarm.backends.onnx_arm import OnnxARM, optimized_cache_path

    src = tmp_path / "model.onnx"
    shutil.copyfile(tiny_bundle / "arms" / "alpha" / "model.onnx", src)
    monkeypatch.setenv("EDGE_GENARM_ORT_CACHE", "1")
    monkeypatch.setenv("EDGE_GENARM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_arm, "CACHE_MIN_SECONDS", 1e9)  # nothing is slow enough to be worth a copy
    a = OnnxARM(src, "a")
    entry = optimized_cache_path(src)
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name + ".fast"]  # a marker, no weights
    b = OnnxARM(src, "b")
    assert not b.from_cache and b.prefill([1, 2, 3]).tolist() == a.prefill([1, 2, 3]).tolist()
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name + ".fast"]


def test_optimized_cache_of_an_arm_with_external_data(tiny_bundle, tmp_path, monkeypatch):
    import numpy as np
    from edge_genarm.export.onnx_export import _externalize

    from edge_genarm.backends import onnx_arm
    from edge_genarm.backends.onnx_arm import OnnxARM

    src = tmp_path / "arm" / "model.onnx"
    src.parent.mkdir()
    shutil.copyfile(tiny_bundle / "arms" / "alpha" / "model.onnx", src)
    _externalize(src, threshold=0)
    ids = [1, 4093, 198, 19556]
    plain = OnnxARM(src, "plain").prefill(ids)
    monkeypatch.setenv("EDGE_GENARM_ORT_CACHE", "1")
    monkeypatch.setenv("EDGE_GENARM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_arm, "CACHE_MIN_SECONDS", 0.0)
    monkeypatch.setattr(onnx_arm, "CACHE_READ_BYTES_PER_S", float("inf"))
    OnnxARM(src, "a")
    again = OnnxARM(src, "b")
    assert again.from_cache  # its weights were saved beside it, not left pointing at model.onnx_data
    np.testing.assert_allclose(again.prefill(ids), plain, atol=1e-4)


def test_an_unwritable_graph_cache_only_costs_speed(tiny_bundle, tmp_path, monkeypatch):
    from edge_genarm.backends.onnx_arm import OnnxARM

    (tmp_path / "not-a-folder").write_text("x")
    monkeypatch.setenv("EDGE_GENARM_ORT_CACHE", "1")
    monkeypatch.setenv("EDGE_GENARM_CACHE", str(tmp_path / "not-a-folder" / "cache"))
    arm = OnnxARM(tiny_bundle / "arms" / "alpha" / "model.onnx", "a")
    assert not arm.from_cache and arm.prefill([1, 2, 3]).shape[-1] > 0


@pytest.mark.parametrize("has_filters", [True, False])
def test_the_converter_sdist_is_extracted_safely_with_or_without_tar_filters(tmp_path, monkeypatch, has_filters):
    """Python < 3.11.4 (Debian 12's 3.11.2) has no tarfile filters: the members are checked by hand
    there, a path leaving the folder is refused with the archive named, and plain files extract."""
    import io
    import tarfile

    from edge_genarm.export.converter import safe_extract

    from edge_genarm.errors import EdgeGenarmError

    if not has_filters:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)

    def archive(names):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = 2
                tar.addfile(info, io.BytesIO(b"ok"))
        buf.seek(0)
        return tarfile.open(fileobj=buf)

    with archive(["pkg/vendor/llama.cpp/convert.py"]) as tar:
        safe_extract(tar, tar.getmembers(), tmp_path / "out", tmp_path / "x.tar.gz")
    assert (tmp_path / "out" / "pkg/vendor/llama.cpp/convert.py").read_text() == "ok"
    with archive(["pkg/../../escape.py"]) as tar, pytest.raises((EdgeGenarmError, tarfile.TarError)) as e:
        safe_extract(tar, tar.getmembers(), tmp_path / "out2", tmp_path / "x.tar.gz")
    assert not (tmp_path / "escape.py").exists() and not (tmp_path.parent / "escape.py").exists()
    if not has_filters:
        assert "x.tar.gz" in str(e.value) and "not a plain file inside the archive" in str(e.value)
