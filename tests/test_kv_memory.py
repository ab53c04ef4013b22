"""What an ARM keeps alive between forwards: its KV cache, nothing more.

onnxruntime's IOBinding holds its inputs and outputs for as long as any of its outputs lives;
the new KV cache is one, so without clearing the binding an ARM kept the prefill's whole
[n, vocab] logits until its next forward, and after each step the previous step's KV cache
beside the new one (2 x 37 MB per head at 3,100 positions on the default pack). Measured with
glibc's in-use byte count (mallinfo2), which counts live blocks only, whatever the heap's shape.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]  # fmt: skip


def _live_bytes() -> int:
    """Bytes in live malloc blocks: heap chunks in use plus mmapped ones."""
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("this C library has no mallinfo2 (glibc >= 2.33)")
    libc.mallinfo2.restype = _Mallinfo2
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd


def _kv_bytes(arm) -> int:
    return sum(v.numpy().nbytes for v in arm._past.values())


def test_an_arm_keeps_its_kv_cache_and_not_the_prefill_logits(tiny_bundle):
    from edge_genarm.backends.onnx_arm import OnnxARM

    arm = OnnxARM(tiny_bundle / "arms" / "alpha" / "model.onnx", "alpha", cache=False)
    n = 400
    ids = [int(t) for t in np.random.default_rng(0).integers(3, 1000, n)]
    arm.prefill(ids[:8])
    arm.reset()
    before = _live_bytes()
    last = arm.prefill(ids)
    logits_bytes = n * last.size * 4  # the prefill's whole output: 78 MB at a 49k vocabulary
    after_prefill = _live_bytes() - before
    assert after_prefill < _kv_bytes(arm) + logits_bytes / 8, (after_prefill, _kv_bytes(arm), logits_bytes)
    for t in ids[:3]:
        arm.step(t)
    after_steps = _live_bytes() - before
    assert after_steps < _kv_bytes(arm) + logits_bytes / 8, (after_steps, _kv_bytes(arm), logits_bytes)
