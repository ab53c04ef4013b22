"""The pack builder on a tiny recipe: checksum refusal, interrupted build resumes, list/rm."""

import json

import pytest

from edge_genarm import load
from edge_genarm.bundle import sha256_file
from edge_genarm.errors import EdgeGenarmError

pytest.importorskip("peft")
from edge_genarm import pack  # noqa: E402

from .test_train import write_pairs  # noqa: E402


@pytest.fixture
def recipe(tiny_bundle, tmp_path, monkeypatch):
    d = tmp_path / "recipes" / "tiny-pack"
    d.mkdir(parents=True)
    write_pairs(d / "pairs.jsonl", n=16)
    base = tiny_bundle / "base.gguf"
    (d / "recipe.toml").write_text(
        f'[base]\npath = "{base}"\nsha256 = "{sha256_file(base)}"\n'
        '[arms.yes]\ndata = "pairs.jsonl"\nbeta_r = 0.5\nlora = 4\nepochs = 1\nbatch_size = 8\nmax_len = 64\n'
    )
    monkeypatch.setenv("EDGE_GENARM_RECIPES", str(tmp_path / "recipes"))
    monkeypatch.setenv("EDGE_GENARM_CACHE", str(tmp_path / "cache"))
    return d


def test_checksum_mismatch_is_refused(recipe):
    text = (recipe / "recipe.toml").read_text()
    (recipe / "recipe.toml").write_text(text.replace('sha256 = "', 'sha256 = "00'))
    with pytest.raises(EdgeGenarmError, match="does not match the recipe's sha256"):
        pack.build_pack("tiny", log=lambda m: None)
    with pytest.raises(EdgeGenarmError, match="no recipe for pack 'nope'.*available packs: tiny"):
        pack.build_pack("nope")


def test_interrupted_build_resumes_and_finishes(recipe, monkeypatch):
    import edge_genarm.export.commands as commands

    real = commands.export_arm

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "export_arm", boom)
    with pytest.raises(KeyboardInterrupt):
        pack.build_pack("tiny", log=lambda m: None)
    assert pack.built_bundle("tiny") is None
    assert [p["state"] for p in pack.list_packs()] == ["partial"]
    trained = pack.packs_root() / "tiny" / "train" / "yes" / "edge_genarm_arm.json"
    assert trained.is_file()
    import edge_genarm.export.train_arm as arm_training

    def no_training(*a, **k):
        raise AssertionError("the finished training must not be redone")

    monkeypatch.setattr(arm_training, "train_arm", no_training)
    monkeypatch.setattr(commands, "export_arm", real)
    bundle = pack.build_pack("tiny", log=lambda m: None)
    assert not trained.exists()  # a built pack keeps only what it runs
    assert pack.built_bundle("tiny") == bundle and pack.list_packs()[0]["state"] == "built"
    e = load(str(bundle))
    assert list(e.weights) == ["yes"] and e.generate("Hi", max_tokens=3, seed=0).tokens
    assert json.loads((bundle / "manifest.json").read_text())["arms"]["yes"]["parity"]["passed"]
    assert pack.remove_pack("tiny") and pack.built_bundle("tiny") is None


def test_committed_adapter_is_applied_without_training(recipe, monkeypatch, tiny_root, tmp_path):
    import shutil

    import edge_genarm.export.train_arm as arm_training

    work = tmp_path / "trained"
    arm_training.train_arm(recipe / "pairs.jsonl", tiny_root / "bundle" / "base.gguf", work, beta_r=0.5, lora_r=4,
                         lr=5e-2, batch_size=8, eval_frac=0, progress=False)  # fmt: skip
    shutil.copytree(work / "adapter", recipe / "adapters" / "yes")
    text = (
        (recipe / "recipe.toml").read_text().replace("[arms.yes]\n", '[arms.yes]\nadapter = "adapters/yes"\n')
    )
    (recipe / "recipe.toml").write_text(text)

    def no_training(*a, **k):
        raise AssertionError("a committed adapter must not be retrained")

    monkeypatch.setattr(arm_training, "train_arm", no_training)
    bundle = pack.build_pack("tiny", log=lambda m: None)
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["arms"]["yes"]["parity"]["passed"]
    assert m["arms"]["yes"]["training"]["from_adapter"].endswith("adapters/yes")
    assert not (pack.packs_root() / "tiny" / "train").exists()  # no checkpoints left behind
    with pytest.raises(AssertionError, match="must not be retrained"):
        pack.build_pack("tiny", log=lambda m: None, retrain=True)  # --retrain: trains from the pairs


def test_pack_shares_one_trunk_in_the_fastest_form_that_passes_the_gate(recipe):
    text = (
        (recipe / "recipe.toml")
        .read_text()
        .replace("max_len = 64\n", "max_len = 64\nlora_layers = 1\neval_frac = 0.5\n")
    )
    text += (
        text[text.index("[arms.yes]") :]
        .replace("[arms.yes]", "[arms.no]")
        .replace("beta_r = 0.5", "beta_r = 0.5\nseed = 1")
    )
    (recipe / "recipe.toml").write_text(text + '[share]\nquantize = ["int4"]\n')
    bundle = pack.build_pack("tiny", log=lambda m: None)
    m = json.loads((bundle / "manifest.json").read_text())
    (t,) = m["trunks"].values()
    assert t["layers"] == 1 and t["quantize"] == "int4"  # layer 0 shared; LoRA on the last layer only
    for arm in ("yes", "no"):
        g = m["arms"][arm]["gate"]
        assert g["passed"] and g["pairs"] == 8 and g["type"] == "int4"
    assert not (pack.packs_root() / "tiny" / "train").exists()
    e = load(str(bundle))
    assert type(e.arms["yes"]).__name__ == "HeadARM" and e.generate("Hi", max_tokens=3, seed=0).tokens
    e.close()


def test_one_arm_pack_cut_at_its_layer_and_named_by_pack_name(recipe):
    """A one-ARM recipe with `[share] layer` gets a trunk of its own first layers (what the base
    tap needs); `--weights pack:NAME` builds it on first use and names unknown packs."""
    from edge_genarm.cli_common import weights_or_default

    text = (recipe / "recipe.toml").read_text().replace("max_len = 64\n", "max_len = 64\nlora_layers = 1\n")
    (recipe / "recipe.toml").write_text(text + "[share]\nlayer = 1\n")
    assert pack.stage_names(pack.load_recipe("tiny"))[-2:] == ["shared trunk", "placement"]
    bundle = weights_or_default("pack:tiny")
    assert bundle == str(pack.built_bundle("tiny"))
    m = json.loads((pack.built_bundle("tiny") / "manifest.json").read_text())
    (t,) = m["trunks"].values()
    assert t["layers"] == 1 and t["n_layers"] == 2 and m["arms"]["yes"]["gate"]["passed"]
    assert weights_or_default("pack:tiny") == bundle  # built: no second build
    for bad, msg in (("pack:nope", "no recipe for pack 'nope'.*available packs: tiny"), ("pack:", "needs a name")):
        with pytest.raises(EdgeGenarmError, match=msg):
            weights_or_default(bad)


def test_pack_ships_a_nudge_table_from_its_recipe(recipe):
    text = (recipe / "recipe.toml").read_text()
    text += '[nudges]\nsource = "yes"\nprompts = "pairs.jsonl"\nn_prompts = 3\nmax_tokens = 6\ntau = 0.0\n'
    (recipe / "recipe.toml").write_text(text)
    logs = []
    bundle = pack.build_pack("tiny", log=logs.append)
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["nudges"]["n_prompts"] == 3 and m["nudges"]["n_sites"] > 0
    assert any("nudge table from ARM 'yes'" in line for line in logs)
    assert not (pack.packs_root() / "tiny" / "train").exists()
    from edge_genarm.nudge import NudgeConfig

    e = load(str(bundle), arms=[])  # nudging alone: no ARM runs
    c = e.generate("Hi", max_tokens=4, seed=0, nudge=NudgeConfig(tau=0.0))
    assert e.nudge_table is not None and c.nudge.sites and not e.arms
    e.close()


def test_pack_refuses_a_nudge_source_that_is_not_an_arm(recipe, tmp_path):
    r = {"nudges": {"source": "nope", "prompts": "pairs.jsonl"}, "_dir": recipe}
    with pytest.raises(EdgeGenarmError, match="\\[nudges\\] source 'nope' has no checkpoint"):
        pack.make_nudges(tmp_path, tmp_path / "train" / "nope", r, log=lambda m: None)


def test_without_the_train_extra_the_default_falls_back_and_a_named_pack_says_what_to_install(
    recipe, monkeypatch
):
    import sys

    (recipe.parent / "default-pack").mkdir()
    (recipe.parent / "default-pack" / "recipe.toml").write_text((recipe / "recipe.toml").read_text())
    monkeypatch.setitem(sys.modules, "peft", None)  # as when the train extra is not installed
    said = []
    assert pack.default_bundle(log=said.append) == pack.fetch_base(pack.load_recipe("default")["base"])
    assert "train extra" in said[0] and "without ARMs" in said[0]
    with pytest.raises(
        EdgeGenarmError, match=r"pack 'tiny' is not built.*pip install 'edge-genarm\[train\]'"
    ):
        pack.pack_bundle("tiny")
    assert not (pack.packs_root() / "tiny").exists()  # nothing was started


def _chunk_packages(root, base, n=3):
    """`base` split into n chunks, each the data file of an importable package (as PyPI's chunk
    packages ship a GGUF over the file-size limit)."""
    data = base.read_bytes()
    size = -(-len(data) // n)
    parts = []
    for i in range(n):
        mod = root / f"tinychunk_part{i}"
        (mod / "data").mkdir(parents=True)
        (mod / "__init__.py").write_text("")
        (mod / "data" / f"base.gguf.part{i:02d}").write_bytes(data[i * size : (i + 1) * size])
        parts.append([f"tinychunk-part{i}==1.0", f"tinychunk_part{i}/data/base.gguf.part{i:02d}"])
    return parts


def test_a_base_in_chunk_packages_is_assembled_checked_and_reused(recipe, tiny_bundle, tmp_path, monkeypatch):
    """`[base] parts`: the chunks concatenated in order into the cache, sha256-checked; chunks in
    the wrong order are refused and leave no file; an assembled base is not assembled again."""
    base = tiny_bundle / "base.gguf"
    parts = _chunk_packages(tmp_path / "site", base)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = {"file": "assembled.gguf", "sha256": sha256_file(base), "parts": parts}
    out = pack.fetch_base(spec, log=lambda m: None)
    assert out.read_bytes() == base.read_bytes() and out.parent.name == "downloads"
    out.unlink()
    with pytest.raises(EdgeGenarmError, match="do not assemble to the recipe's sha256"):
        pack.fetch_base({**spec, "parts": parts[::-1]}, log=lambda m: None)
    assert not list(out.parent.glob("assembled.gguf*"))
    pack.fetch_base(spec, log=lambda m: None)
    mtime = out.stat().st_mtime_ns
    for p in parts:  # the packages gone: the assembled file is still there and still checked
        (tmp_path / "site" / p[1]).unlink()
    assert pack.fetch_base(spec, log=lambda m: None) == out and out.stat().st_mtime_ns == mtime


def test_a_recipe_template_is_the_bundles_and_the_trainings(recipe, monkeypatch):
    """`chat_template` in a recipe: the bundle prompts with it, and the ARM is trained on prompts
    rendered with it (the text the runtime sends); a template that drops the prompt is refused."""
    (recipe / "t.jinja").write_text("{% for m in messages %}Q: {{ m.content }}\n{% endfor %}A:")
    text = (recipe / "recipe.toml").read_text()
    (recipe / "recipe.toml").write_text('chat_template = "t.jinja"\n' + text)
    import edge_genarm.export.train_loop as train_loop

    seen = []
    real = train_loop.encode_pairs

    def spy(tok, pairs, *a, **k):
        seen.append(tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False))
        return real(tok, pairs, *a, **k)

    monkeypatch.setattr("edge_genarm.export.train_loop.encode_pairs", spy)
    bundle = pack.build_pack("tiny", log=lambda m: None)
    assert seen == ["Q: hello\nA:"]
    e = load(bundle)
    assert e.format_prompt("hello") == "Q: hello\nA:"
    e.close()
    (recipe / "t.jinja").write_text("{% for m in messages %}Q:{% endfor %}")
    with pytest.raises(EdgeGenarmError, match="leaves the user's message out"):
        pack.build_pack("tiny", force=True, log=lambda m: None)


def test_a_recipe_key_under_the_wrong_table_is_refused(recipe):
    """A top-level key written after [base] lands in [base] (TOML): refused with the fix, not dropped."""
    text = (recipe / "recipe.toml").read_text()
    (recipe / "recipe.toml").write_text(text.replace("[arms.yes]", 'chat_template = "t.jinja"\n[arms.yes]'))
    with pytest.raises(EdgeGenarmError, match=r"unknown key\(s\) chat_template in \[base\].*before the first"):
        pack.load_recipe("tiny")
    (recipe / "recipe.toml").write_text("colour = 1\n" + text)
    with pytest.raises(EdgeGenarmError, match="unknown key.*colour in the top level"):
        pack.build_pack("tiny", log=lambda m: None)
