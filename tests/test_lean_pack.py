"""The torch-free pack build (export/lean_pack.py) and its gates-once record (export/pack_record.py).

A tiny recipe (tests/tiny_pack.py: two committed LoRA adapters on the tiny base, one int8
trunk) builds through numpy, onnx and onnxruntime; its record is written; a rebuild with torch,
transformers, optimum and peft unimportable copies the recorded gate figures into identical
files; a record that does not match the files makes the build run the gates and say why.
"""

from __future__ import annotations

import json
import sys

import pytest

from edge_genarm.errors import EdgeGenarmError

pytest.importorskip("peft")  # tiny_pack writes its adapters with peft
from edge_genarm.export.pack_record import HELDOUT, RECORD  # noqa: E402
from edge_genarm.export.record_pack import record_pack  # noqa: E402

from edge_genarm import pack  # noqa: E402

from .tiny_pack import make_recipe  # noqa: E402

HEAVY = ("torch", "transformers", "optimum", "peft")


def _no_torch(monkeypatch):
    for m in HEAVY:
        monkeypatch.setitem(sys.modules, m, None)  # `import torch` raises ImportError


def _files(bundle):
    m = json.loads((bundle / "manifest.json").read_text())
    return {rel: r["sha256"] for rel, r in m["files"].items()}, m


@pytest.fixture(scope="module")
def recorded(tiny_root, tmp_path_factory):
    """The tiny recipe built once (no record: the gates run) and then recorded."""
    work = tmp_path_factory.mktemp("lean")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGE_GENARM_RECIPES", str(work / "recipes"))
    mp.setenv("EDGE_GENARM_CACHE", str(work / "cache"))
    d = make_recipe(work / "recipes", tiny_root)
    logs: list[str] = []
    bundle = pack.build_pack("tiny", log=logs.append)
    files, m = _files(bundle)
    record_pack("tiny")
    yield {"dir": d, "logs": logs, "files": files, "manifest": m}
    mp.undo()


@pytest.fixture
def env(recorded, monkeypatch):
    monkeypatch.setenv("EDGE_GENARM_RECIPES", str(recorded["dir"].parent))
    monkeypatch.setenv("EDGE_GENARM_CACHE", str(recorded["dir"].parent.parent / "cache"))
    return recorded


def test_first_build_runs_the_gates_without_torch_stages(recorded):
    logs, m = recorded["logs"], recorded["manifest"]
    assert any("records no build" in line and "running the gates" in line for line in logs), logs
    assert any(line.startswith("parity ARM 'yes' (f32)") and line.endswith("passed") for line in logs), logs
    (t,) = m["trunks"].values()
    assert t["quantize"] == "int8" and t["graph"] == "compact" and t["layers"] == 1 and t["n_layers"] == 2
    for arm in ("yes", "no"):
        a = m["arms"][arm]
        assert a["gate"]["passed"] and a["gate"]["pairs"] == 8 and "recorded" not in a["gate"]
        assert a["parity"]["max_abs_logit_diff"] < 1e-3 and a["file"] == f"arms/{arm}/head.onnx"
    rec = json.loads((recorded["dir"] / RECORD).read_text())
    assert rec["files"] == recorded["files"] and rec["share"]["quantize"] == "int8"
    held = json.loads((recorded["dir"] / HELDOUT).read_text())
    assert len(held["arms"]["yes"]["pairs"]) == 8 and all(len(p) == 3 for p in held["arms"]["yes"]["pairs"])


def test_rebuild_without_torch_copies_the_recorded_figures_into_identical_files(env, monkeypatch):
    _no_torch(monkeypatch)
    with pytest.raises(ImportError):
        import torch  # noqa: F401
    logs: list[str] = []
    bundle = pack.build_pack("tiny", force=True, log=logs.append)
    files, m = _files(bundle)
    assert files == env["files"]  # byte-identical bundle
    assert any("files identical to the recipe's record" in line for line in logs), logs
    assert not any("running the gates" in line for line in logs), logs
    for arm in ("yes", "no"):
        g = m["arms"][arm]["gate"]
        assert g.pop("recorded") is True and g == env["manifest"]["arms"][arm]["gate"]
    from edge_genarm import load

    e = load(str(bundle))
    assert type(e.arms["yes"]).__name__ == "HeadARM" and e.generate("Hi", max_tokens=3, seed=0).tokens
    e.close()


def test_a_record_that_does_not_match_runs_the_gates_and_says_which_file(env, monkeypatch):
    rec_path = env["dir"] / RECORD
    rec = json.loads(rec_path.read_text())
    trunk = next(k for k in rec["files"] if k.endswith("/trunk.onnx"))
    rec["files"][trunk] = "0" * 64
    original = rec_path.read_text()
    rec_path.write_text(json.dumps(rec))
    try:
        _no_torch(monkeypatch)  # the held-out pairs come from heldout.json: no tokenizer needed
        logs: list[str] = []
        bundle = pack.build_pack("tiny", force=True, log=logs.append)
    finally:
        rec_path.write_text(original)
    assert f"hash of {trunk} differs from the recipe's: running the gates" in logs, logs
    files, m = _files(bundle)
    assert files == env["files"]
    for arm in ("yes", "no"):
        g = m["arms"][arm]["gate"]
        assert "recorded" not in g and g == env["manifest"]["arms"][arm]["gate"]  # measured again, the same


def test_a_recipe_records_one_build_per_machine_whose_quantizer_writes_other_bytes(env, monkeypatch):
    """recorded.json can hold several builds (onnxruntime's quantizer writes other bytes on some
    CPUs): a build matching any of them copies that one's figures; `record_pack` puts this
    machine's build first and keeps the others."""
    rec_path = env["dir"] / RECORD
    original = rec_path.read_text()
    mine = json.loads(original)
    other = json.loads(original)
    trunk = next(k for k in other["files"] if k.endswith("/trunk.onnx"))
    other["files"][trunk] = "0" * 64
    other["gates"]["yes"] = {**other["gates"]["yes"], "accuracy_fp32": -1.0}  # tells the two apart
    try:
        rec_path.write_text(json.dumps({"note": "two machines", "builds": [other, mine]}))
        record_pack("tiny")  # this machine's build first, the other kept; recording again adds nothing
        record_pack("tiny")
        builds = json.loads(rec_path.read_text())["builds"]
        assert [b["files"][trunk] for b in builds] == [mine["files"][trunk], "0" * 64]
        rec_path.write_text(json.dumps({"note": "two machines", "builds": [other, mine]}))
        _no_torch(monkeypatch)
        logs: list[str] = []
        bundle = pack.build_pack("tiny", force=True, log=logs.append)
        assert any("files identical to the recipe's record" in line for line in logs), logs
        assert not any("running the gates" in line for line in logs), logs
        _, m = _files(bundle)
        assert m["arms"]["yes"]["gate"]["accuracy_fp32"] == mine["gates"]["yes"]["accuracy_fp32"]
        rec_path.write_text(json.dumps({"note": "two machines", "builds": [other, {**other, "files": {trunk: "1" * 64}}]}))
        logs.clear()
        pack.build_pack("tiny", force=True, log=logs.append)
        assert any("none of the recipe's 2 recorded builds matches" in line for line in logs), logs
    finally:
        rec_path.write_text(original)


def test_without_torch_a_recipe_that_needs_training_says_what_to_install(env, monkeypatch):
    text = (env["dir"] / "recipe.toml").read_text()
    (env["dir"] / "recipe.toml").write_text(text.replace('adapter = "adapters/no"\n', ""))
    try:
        _no_torch(monkeypatch)
        with pytest.raises(EdgeGenarmError, match=r"cannot be built without torch \(ARM\(s\) no have no committed adapter.*pip install 'edge-genarm\[train\]'"):
            pack.build_pack("tiny", force=True, log=lambda m: None)
    finally:
        (env["dir"] / "recipe.toml").write_text(text)


def test_missing_lean_module_and_no_torch_is_a_clear_error(env, monkeypatch):
    from edge_genarm.export import lean_pack

    monkeypatch.setattr(lean_pack, "missing_modules", lambda: ["gguf"])
    _no_torch(monkeypatch)
    with pytest.raises(EdgeGenarmError, match=r"without torch \(gguf not installed\)"):
        pack.build_pack("tiny", force=True, log=lambda m: None)

