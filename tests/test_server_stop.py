"""Stopping the server while a generation runs (Scheduler.close, as the app's shutdown calls it).

A long prompt's prefill is one call into llama.cpp or onnxruntime that the cancel flag cannot
reach; `serve` gives a running generation `stop_grace` seconds to stop between tokens, then
calls `on_stuck` (which exits the process) instead of waiting for the forward to end. The
generations here stand in for the engine's: one stuck in its first forward, one that yields a
token every 20 ms (the scheduler only iterates them and checks the flag between tokens).
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

from edge_genarm.server.worker import Job, Scheduler


class _Gen:
    """A generation: the first `next` blocks `first_s` seconds (a prefill), then a token per `step_s`
    (250 at most)."""

    def __init__(self, first_s: float, step_s: float = 0.02):
        self.first_s, self.step_s, self.calls = first_s, step_s, 0
        self.entered = threading.Event()
        self.engine = SimpleNamespace(base=SimpleNamespace(last_prefill_evaluated=0))

    def __iter__(self):
        return self

    def __next__(self):
        self.entered.set()
        self.calls += 1
        if self.calls > 250:  # a bound, so that a scheduler that never stops it fails instead of hanging
            raise StopIteration
        time.sleep(self.first_s if self.calls == 1 else self.step_s)
        return SimpleNamespace(token=1)


def _close_while_running(gen: _Gen, grace: float) -> tuple[Job, list, float]:
    """Start `gen` as a job, close the scheduler mid-run; (the job, on_stuck's calls as
    (job, seconds after close began), close's seconds)."""

    async def main():
        s = Scheduler()
        job = Job(gen)

        async def consume():
            async for _ in s.run(job):
                pass

        task = asyncio.create_task(consume())
        await asyncio.to_thread(gen.entered.wait, 5)
        stuck, t0 = [], time.perf_counter()
        s.stop_grace, s.on_stuck = grace, lambda j: stuck.append((j, time.perf_counter() - t0))
        s.close()  # blocks the loop, as the app's shutdown does
        took = time.perf_counter() - t0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return job, stuck, took

    return asyncio.run(main())


def test_a_generation_inside_a_long_forward_is_not_waited_for_past_the_grace():
    job, stuck, _ = _close_while_running(_Gen(first_s=2.0), grace=0.3)
    assert job.cancel.is_set()
    assert len(stuck) == 1 and stuck[0][0] is job
    assert 0.25 < stuck[0][1] < 1.5, stuck  # called at the grace, not after the 2 s forward


def test_a_generation_between_tokens_stops_within_the_grace():
    gen = _Gen(first_s=0.0)
    job, stuck, took = _close_while_running(gen, grace=2.0)
    assert stuck == [] and job.cancel.is_set()
    assert job.status == "cancelled" and took < 1.0, (job.status, took)
