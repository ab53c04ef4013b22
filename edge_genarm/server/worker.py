"""One generation at a time: a bounded FIFO of requests in front of one engine thread.

The engine is not thread-safe and owns one set of KV caches, so every generation runs
in a single worker thread, one after the other. Requests wait their turn on an
asyncio.Lock (its waiters are served first come, first served); past `max_queue`
waiting requests the next one is refused at once (`QueueFull`, a 503 with Retry-After).

A request's tokens travel from the worker thread to its coroutine through an asyncio
queue. When the client goes away the coroutine is cancelled: a request still waiting
leaves the line and never runs; a running one sets its `cancel` flag, which the worker
checks between tokens, so it stops within one token and the next request starts.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field

import anyio
import numpy as np

from .. import guidance as G
from .. import memory
from ..engine import Generation, StepRecord


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: {retry_after} s until a place is likely free")
        self.retry_after = retry_after


@dataclass
class Piece:
    """One step of a generation as the worker hands it over."""

    rec: StepRecord
    logprob: float | None = None  # log p of the token under the distribution sampling drew from
    top: list[tuple[int, float]] | None = None  # the `top_logprobs` most likely ids of that distribution


_ids = itertools.count(1)


@dataclass
class Job:
    """One admitted request: its Generation, what it asked for, and what happened to it."""

    gen: Generation
    label: str = ""  # endpoint and model, for the log line
    top_logprobs: int | None = None  # None: no log-probs; N: the token's and the N best
    user: str | None = None  # the request's `user` field, if any (logs, tests)
    id: int = field(default_factory=lambda: next(_ids))
    cancel: threading.Event = field(default_factory=threading.Event)
    status: str = "new"  # new -> queued -> running -> done | cancelled | error; or queued -> dropped
    queue_s: float = 0.0
    steps: int = 0  # tokens generated so far (read by other threads: a plain int)
    steps_at_cancel: int | None = None
    prompt_evaluated: int | None = None  # prompt tokens the base evaluated (the rest came from its KV cache)
    _dist: tuple[np.ndarray, np.ndarray] | None = None

    def on_step(self, i: int, scores: np.ndarray, params: G.SamplingParams) -> None:
        """Engine hook (worker thread): the candidates and log-probs sampling is about to draw from."""
        self._dist = G.candidates(scores, params)

    def logprobs(self, tok: int) -> tuple[float | None, list[tuple[int, float]] | None]:
        if self.top_logprobs is None or self._dist is None or tok < 0:
            return None, None
        ids, lp = self._dist
        hit = np.flatnonzero(ids == tok)
        own = float(lp[hit[0]]) if hit.size else -math.inf  # a nudge may pick outside the candidates
        n = min(self.top_logprobs, ids.size)
        if n == 0:
            return own, []
        best = np.argpartition(-lp, n - 1)[:n] if n < ids.size else np.arange(ids.size)
        best = best[np.argsort(-lp[best], kind="stable")]
        return own, [(int(ids[j]), float(lp[j])) for j in best]


class Scheduler:
    """The FIFO in front of the engine thread. Create it inside the event loop that serves."""

    def __init__(self, max_queue: int = 16):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_queue = max_queue
        self.waiting = 0
        self.running: Job | None = None
        self.history: deque[Job] = deque(maxlen=256)  # finished jobs, newest last
        self.dropped = 0  # requests cancelled while waiting
        self.started = 0  # generations started (a job that got the engine)
        self.served = 0  # jobs that ran (done, cancelled or failed)
        self._lock = asyncio.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._job_s = 2.0  # running mean of a job's seconds, for Retry-After
        self.stop_grace: float | None = None  # close(): how long a running generation may take to stop
        self.on_stuck = None  # close(): called with the job still running after stop_grace (see close)

    def admit(self) -> None:
        """Raise QueueFull when `max_queue` requests are already waiting behind a busy engine."""
        busy = self._lock.locked() or self.waiting > 0
        if busy and self.waiting >= self.max_queue:
            raise QueueFull(max(1, math.ceil(self._job_s * (self.waiting + 1))))

    async def run(self, job: Job) -> AsyncIterator[Piece]:
        """Wait for the engine, then yield the job's pieces as the worker makes them."""
        self.admit()
        job.status, t0 = "queued", time.perf_counter()
        self.waiting += 1
        try:
            await self._lock.acquire()
        except BaseException:
            job.status = "dropped"
            self.dropped += 1
            self.history.append(job)
            raise
        finally:
            self.waiting -= 1
        job.queue_s = time.perf_counter() - t0
        try:
            job.status, self.running = "running", job
            self.started += 1
            loop = asyncio.get_running_loop()
            q: asyncio.Queue = asyncio.Queue()
            fut = loop.run_in_executor(self._pool, self._work, job, lambda item: loop.call_soon_threadsafe(
                q.put_nowait, item))  # fmt: skip
            try:
                while True:
                    kind, item = await q.get()
                    if kind == "end":
                        break
                    if kind == "error":
                        raise item
                    yield item
            finally:
                if job.status == "running":  # the client left (or the consumer failed): stop between tokens
                    job.steps_at_cancel = job.steps
                    job.cancel.set()
                with anyio.CancelScope(shield=True):  # the engine is free only once the worker stops
                    await fut
        finally:
            self.running, self.served = None, self.served + 1
            self._job_s = 0.8 * self._job_s + 0.2 * max(0.05, time.perf_counter() - t0 - job.queue_s)
            self.history.append(job)
            self._lock.release()

    @staticmethod
    def _work(job: Job, emit) -> None:
        """Worker thread: iterate the generation, checking the cancel flag between tokens."""
        it = iter(job.gen)
        try:
            while not job.cancel.is_set():
                try:
                    rec = next(it)
                except StopIteration:
                    break
                if job.prompt_evaluated is None:
                    job.prompt_evaluated = job.gen.engine.base.last_prefill_evaluated
                if rec.token >= 0:
                    job.steps += 1
                emit(("piece", Piece(rec, *job.logprobs(rec.token))))
            job.status = "cancelled" if job.cancel.is_set() else "done"
        except Exception as e:  # reported to the request; the server goes on
            job.status = "error"
            emit(("error", e))
        finally:
            if hasattr(it, "close"):
                it.close()  # a stopped generation lets go of its arrays now, not when the job is forgotten
            job._dist = None
            memory.trim()  # what this request's context grew is handed back before the next one
            emit(("end", None))

    def close(self) -> None:
        """Shut the engine thread down (the app's shutdown). A running generation is asked to stop
        and waited for; with `stop_grace` set, for at most that many seconds, then `on_stuck` is
        called: a long prompt's prefill is one call into llama.cpp or onnxruntime that no flag
        reaches (~27 s for 3,400 tokens on 2 cores), and `serve` exits then rather than after it."""
        if self.running is not None:
            self.running.cancel.set()
        if self.stop_grace is not None:
            try:
                self._pool.submit(int).result(timeout=self.stop_grace)  # runs once the engine thread is free
            except FuturesTimeout:
                if self.on_stuck is not None:
                    self.on_stuck(self.running)
        self._pool.shutdown(wait=True)
