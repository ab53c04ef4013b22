"""Settings precedence: CLI > environment > file > built-in; typos named."""

import json

import pytest
from click.testing import CliRunner

from edge_genarm.cli import main
from edge_genarm.config import effective
from edge_genarm.errors import ConfigError


def test_precedence_and_sources(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text("temperature = 0.3\ntop_k = 5\n[arms]\nalpha = 0.5\n")
    s = effective({"EDGE_GENARM_TOP_K": "7"}, cfg)
    assert s["temperature"] == (0.3, f"file {cfg}")
    assert s["top_k"] == (7, "env EDGE_GENARM_TOP_K")
    assert s["arms"] == ({"alpha": 0.5}, f"file {cfg}")
    assert s["top_p"][1] == "default"


def test_typos_are_named(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("temprature = 0.3\n")
    with pytest.raises(ConfigError, match="unknown setting 'temprature'.*did you mean 'temperature'"):
        effective({}, cfg)
    with pytest.raises(ConfigError, match="environment variable EDGE_GENARM_TOPK"):
        effective({"EDGE_GENARM_TOPK": "3"}, tmp_path / "none.toml")
    cfg.write_text("top_k = 'many'\n")
    with pytest.raises(ConfigError, match="'top_k' .* must be int"):
        effective({}, cfg)
    cfg.write_text("top_k = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        effective({}, cfg)


def test_cli_uses_file_env_and_flags_in_order(tiny_bundle, tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'weights = "{tiny_bundle}"\nmax_tokens = 3\n[arms]\nalpha = 0.5\n')
    monkeypatch.setenv("EDGE_GENARM_CONFIG", str(cfg))
    r = CliRunner().invoke(main, ["generate", "--json", "--seed", "1", "Hi"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["weights"] == {"alpha": 0.5} and len(out["tokens"]) <= 3
    monkeypatch.setenv("EDGE_GENARM_MAX_TOKENS", "5")
    out = json.loads(CliRunner().invoke(main, ["generate", "--json", "--seed", "1", "Hi"]).output)
    assert 3 < len(out["tokens"]) <= 5 or out["finish_reason"] == "stop"
    out = json.loads(CliRunner().invoke(main, ["generate", "--json", "--seed", "1", "-n", "2", "Hi"]).output)
    assert len(out["tokens"]) <= 2
    r = CliRunner().invoke(main, ["config", "show"])
    assert "max_tokens      = 5" in r.output and "env EDGE_GENARM_MAX_TOKENS" in r.output


def test_doctor_reports_and_fails_on_problems(tiny_bundle):
    r = CliRunner().invoke(main, ["doctor", "--weights", str(tiny_bundle)])
    assert r.exit_code == 0, r.output
    for s in ("llama.cpp", "onnxruntime", "CPUExecutionProvider", "ARM alpha", "no problems found"):
        assert s in r.output
    r = CliRunner().invoke(main, ["doctor", "--weights", "/nonexistent"])
    assert r.exit_code == 1 and "does not exist" in r.output


def test_every_edge_genarm_variable_the_project_reads_is_a_setting_or_declared_not_one():
    """A variable the project itself reads (the server's origins, the tests' browser switch...)
    must not make every command fail as an unknown setting."""
    import re
    from pathlib import Path

    from edge_genarm.config import ENV_PREFIX, KEYS, NOT_SETTINGS

    root = Path(__file__).resolve().parent.parent
    texts = [p.read_text() for d in ("edge_genarm", "export", "scripts") for p in (root / d).rglob("*.py")]
    texts += [(root / ".ci" / "run").read_text(), (root / "tests" / "conftest.py").read_text()]
    read = {v for t in texts for v in re.findall(r"EDGE_GENARM_[A-Z][A-Z_]*[A-Z]", t)}
    assert "EDGE_GENARM_REQUIRE_BROWSER" in read and "EDGE_GENARM_ORIGINS" in read
    settings = {ENV_PREFIX + k.upper() for k in KEYS}
    assert read - settings - NOT_SETTINGS == set()
