import json
import subprocess
import sys


def test_runtime_path_never_imports_heavy_libraries(tiny_bundle):
    code = f"""
import sys, json, edge_genarm
e = edge_genarm.load({str(tiny_bundle)!r})
e.generate("Hi", max_tokens=3, seed=0)
print(json.dumps([m for m in ("torch", "transformers", "optimum", "onnx") if m in sys.modules]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
