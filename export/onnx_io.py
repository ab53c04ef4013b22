"""Writing ONNX graphs into an export: the atomic save, and the quantize-gate-swap step.

Shared by the graph builders (compact.py, split.py) and the exporters (commands.py,
rm_export.py, share.py); it imports none of them, so none of them import each other for it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def save_model(model, path: Path) -> None:
    """Write atomically; weights over 64 MB go to a data file beside it (faster session creation)."""
    import onnx

    tmp = path.with_name(path.name + ".partial")
    big = sum(len(i.raw_data) for i in model.graph.initializer) > (64 << 20)
    # onnx appends to an existing data file: a model re-saved over itself (quantized in place)
    # would keep its old weights in it. `model` is in memory, so the old file can go.
    Path(str(path) + "_data").unlink(missing_ok=True)
    if big:
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + "_data", size_threshold=1024)  # fmt: skip
    else:
        onnx.save_model(model, str(tmp))
    tmp.replace(path)


def gate_then_swap(onnx_dir: Path, quantized, judge: Callable[[Path, Path], dict]) -> dict:
    """Put the quantized graph `quantized` (a ModelProto) in place of onnx_dir/model.onnx if the
    gate lets it: it is written to a sibling folder, `judge(fp32_path, quantized_path)` measures
    it and returns the gate record (or raises to refuse: onnx_dir is then left as it was), and
    only then do the quantized files replace the fp32 ones. Returns the gate record."""
    src = onnx_dir / "model.onnx"
    qdir = onnx_dir.with_name(onnx_dir.name + "-q")
    qdir.mkdir()
    save_model(quantized, qdir / "model.onnx")
    record = judge(src, qdir / "model.onnx")
    for p in onnx_dir.glob("model.onnx*"):
        p.unlink()
    for p in qdir.iterdir():
        p.rename(onnx_dir / p.name)
    qdir.rmdir()
    return record
