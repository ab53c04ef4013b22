"""Thread and device selection logic, testable without a GPU."""

import pytest

from edge_genarm.backends.onnx_arm import resolve_providers
from edge_genarm.errors import ConfigError
from edge_genarm.loader import overlap_pays, split_threads


def test_split_threads():
    assert split_threads(2, 1, parallel=False) == (2, 2)
    assert split_threads(2, 1, parallel=True) == (1, 1)
    assert split_threads(8, 1, parallel=True) == (4, 4)
    assert split_threads(8, 3, parallel=True) == (2, 2)
    assert split_threads(2, 3, parallel=True) == (1, 1)
    assert split_threads(4, 0, parallel=True) == (4, 4)


def test_overlap_pays_by_size(tmp_path):
    base = tmp_path / "base.gguf"
    base.write_bytes(b"x" * 1000)
    small, big = tmp_path / "s" / "model.onnx", tmp_path / "b" / "model.onnx"
    small.parent.mkdir()
    big.parent.mkdir()
    small.write_bytes(b"x" * 100)
    big.write_bytes(b"x" * 300)
    (big.parent / "model.onnx_data").write_bytes(b"x" * 300)  # external data counts
    assert not overlap_pays(base, [small])
    assert overlap_pays(base, [big])
    assert not overlap_pays(base, [])


def test_providers():
    cpu_only = ["CPUExecutionProvider"]
    with_cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with_coreml = ["CoreMLExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("auto", cpu_only) == cpu_only
    assert resolve_providers("auto", with_cuda)[0] == "CUDAExecutionProvider"
    assert resolve_providers("auto", with_coreml)[0] == "CoreMLExecutionProvider"
    assert resolve_providers("CUDA", with_cuda) == with_cuda
    with pytest.raises(ConfigError, match="needs CUDAExecutionProvider.*edge-genarm\\[gpu\\]"):
        resolve_providers("cuda", cpu_only)
    with pytest.raises(ConfigError, match="unknown ARM device 'tpu'"):
        resolve_providers("tpu", cpu_only)
