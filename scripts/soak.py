"""Soak test for `edge-genarm serve`: does memory come back after a day of mixed use?

    .venv/bin/python scripts/soak.py [--weights BUNDLE] [--requests 1000] [--long 10] [--url URL]

Starts the server (the default pack unless --weights; --ctx 4096) on a free port, or uses --url,
then sends --requests requests one after another: short chats (some with per-request weights,
some through Ollama's API), streams cancelled after two tokens, malformed bodies, medium prompts,
and --long prompts of over --long-tokens tokens (sized from a calibration request, checked by the
server's prompt_tokens). After every request it reads the server's RSS from /health and prints
the series every --every requests; at the end it checks:
  - RSS at the end <= RSS after the first 50 requests + 25%;
  - RSS after any request <= warm RSS (after the server's warm-up and one calibration) + 200 MB;
  - no failures among the valid requests, every malformed one a 4xx with an error object.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
EXE = ROOT / ".venv" / "bin" / "edge-genarm"
WORDS = ("the a of and to in is was it for on with as at by from this that be are or an have not but "
         "morning river window garden letter market winter summer friend station music colour paper "
         "light quiet bright slowly later always under over between across because while although "
         "people city house road train coffee bread story number question answer moment evening").split()  # fmt: skip
SHORT = ["Describe a rainy Monday morning.", "Give me three tips for a job interview.",
         "What makes a good cup of tea?", "Tell me about lighthouses.", "Write a haiku about trains."]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text_of(words: int, rng: random.Random) -> str:
    """Varied filler (no two alike, so no KV-cache reuse between long prompts)."""
    return " ".join(rng.choice(WORDS) for _ in range(words)) + ". Summarise the text above in one sentence."


def malformed(rng: random.Random, arm: str) -> tuple[str, bytes, str]:
    """(path, body, content type) that must get a 4xx."""
    msgs = '[{"role": "user", "content": "hi"}]'
    cases = [
        ("/v1/chat/completions", b"{not json", "application/json"),
        ("/v1/chat/completions", b'{"messages": "hi"}', "application/json"),
        ("/v1/chat/completions", b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "application/json"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\udc80"}]}', "application/json"),
        ("/v1/chat/completions", f'{{"messages": {msgs}, "genarm": {{"weights": {{"{arm}": 1e30}}}}}}'.encode(),
         "application/json"),
        ("/v1/chat/completions", f'{{"messages": {msgs}, "temperature": "warm"}}'.encode(), "application/json"),
        ("/v1/chat/completions", f'{{"messages": {msgs}, "max_tokens": 1{"0" * 5000}}}'.encode(), "application/json"),
        ("/v1/chat/completions", f'{{"messages": {msgs}}}'.encode(), "text/plain"),
        ("/api/chat", b'{"model": "x", "messages": 3}', "application/json"),
        ("/api/generate", b'{"prompt": "hi", "options": {"num_predict": "many"}}', "application/json"),
    ]  # fmt: skip
    return rng.choice(cases)


def plan(n: int, n_long: int, seed: int = 0) -> list[str]:
    """The kind of each request: `long` at evenly spaced places, the rest drawn from the mix."""
    rng = random.Random(seed)
    mix = [("short", 40), ("weights", 15), ("ollama", 10), ("cancel", 12), ("malformed", 15), ("medium", 8)]
    kinds = rng.choices([k for k, _ in mix], [w for _, w in mix], k=n)
    for j in range(n_long):
        kinds[(2 * j + 1) * n // (2 * n_long)] = "long"
    return kinds


class Soak:
    def __init__(self, url: str, a):
        self.url, self.a, self.rng = url, a, random.Random(1)
        self.c = httpx.Client(base_url=url, timeout=600)
        models = self.c.get("/v1/models").json()["data"]
        self.model, self.arms = models[0]["id"], list(models[0]["genarm"]["weights"])
        self.tok_per_word = 1.3

    def rss(self) -> float:
        return self.c.get("/health").json()["rss_mb"]

    def chat(self, content: str, max_tokens: int, **extra) -> tuple[bool, int]:
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens, "seed": self.rng.randrange(10**6), **extra}  # fmt: skip
        r = self.c.post("/v1/chat/completions", json=body)
        ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        return ok, r.json()["usage"]["prompt_tokens"] if ok else 0

    def calibrate(self) -> None:
        ok, n = self.chat(text_of(400, self.rng), 1)
        assert ok, "the calibration request failed"
        self.tok_per_word = n / 400

    def send(self, kind: str) -> tuple[bool, str]:
        """Send one request of `kind`; (it went as it should, a note)."""
        a, rng = self.a, self.rng
        if kind in ("short", "weights"):
            extra = (
                {"genarm": {"weights": {x: round(rng.uniform(-1, 2), 2) for x in self.arms}}}
                if kind == "weights"
                else {}
            )
            return self.chat(rng.choice(SHORT), a.max_tokens, **extra)[0], ""
        if kind in ("long", "medium"):
            want = (
                int(1.1 * a.long_tokens) if kind == "long" else a.long_tokens // 4
            )  # 10%: the estimate drifts
            words = int(want / self.tok_per_word) + 20
            ok, n = self.chat(text_of(words, rng), 4)
            if ok and n:
                self.tok_per_word = 0.5 * self.tok_per_word + 0.5 * n / words
            return ok and (kind == "medium" or n > a.long_tokens - 200), f"prompt {n} tokens"
        if kind == "ollama":
            body = {"model": self.model, "messages": [{"role": "user", "content": rng.choice(SHORT)}],
                    "stream": False, "options": {"num_predict": a.max_tokens, "seed": rng.randrange(1000)}}  # fmt: skip
            r = self.c.post("/api/chat", json=body)
            return r.status_code == 200 and r.json().get("done") is True, ""
        if kind == "cancel":
            body = {"model": self.model, "messages": [{"role": "user", "content": rng.choice(SHORT)}],
                    "max_tokens": 200, "stream": True}  # fmt: skip
            with self.c.stream("POST", "/v1/chat/completions", json=body) as r:
                seen = 0
                for line in r.iter_lines():
                    seen += line.startswith("data: ") and '"content":"' in line and '"role"' not in line
                    if seen >= 2:
                        break
            return r.status_code == 200, ""
        path, raw, ctype = malformed(rng, self.arms[0] if self.arms else "x")
        r = self.c.post(path, content=raw, headers={"content-type": ctype})
        err = (
            r.json().get("error")
            if r.headers.get("content-type", "").startswith("application/json")
            else None
        )
        return 400 <= r.status_code < 500 and bool(err), f"{r.status_code}"


def start_server(a) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        str(EXE),
        "serve",
        "--port",
        str(port),
        "--ctx",
        str(a.ctx),
        *(["-m", a.weights] if a.weights else []),
    ]
    log = open("/tmp/soak_server.log", "w")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log), f"http://127.0.0.1:{port}"


def wait_up(url: str, proc) -> None:
    deadline = time.time() + 600
    while True:
        try:
            httpx.get(url + "/health", timeout=2).raise_for_status()
            return
        except httpx.HTTPError:
            if time.time() > deadline or (proc is not None and proc.poll() is not None):
                raise SystemExit("the server did not start: see /tmp/soak_server.log") from None
            time.sleep(1)


def soak(s: Soak, a) -> dict:
    s.calibrate()
    warm = s.rss()
    print(f"warm RSS {warm:.1f} MB (after the server's warm-up and one calibration request); "
          f"{s.tok_per_word:.2f} tokens per word", flush=True)  # fmt: skip
    kinds, series, fails, counts, t0 = plan(a.requests, a.long), [], [], {}, time.time()
    for i, kind in enumerate(kinds, 1):
        try:
            ok, note = s.send(kind)
        except (httpx.HTTPError, ValueError, KeyError) as e:
            ok, note = False, f"{type(e).__name__}: {e}"
        counts[kind] = counts.get(kind, 0) + 1
        if not ok:
            fails.append((i, kind, note))
        series.append((i, kind, s.rss(), note))
        if i % a.every == 0 or kind == "long":
            print(f"req {i:5d} {kind:9s} rss {series[-1][2]:8.1f} MB ({series[-1][2] - warm:+7.1f}) "
                  f"t={time.time() - t0:6.0f}s {note}", flush=True)  # fmt: skip
    return {"warm": warm, "series": series, "fails": fails, "counts": counts, "wall": time.time() - t0}


def verdict(r: dict, a) -> bool:
    warm, series = r["warm"], r["series"]
    at50 = series[min(49, len(series) - 1)][2]
    end, peak = series[-1][2], max(x[2] for x in series)
    longs = [x for x in series if x[1] == "long"]
    bad = [f for f in r["fails"] if f[1] == "malformed"]
    valid = [f for f in r["fails"] if f[1] != "malformed"]
    checks = [
        (f"RSS at the end {end:.1f} MB <= after 50 requests {at50:.1f} MB + 25% ({1.25 * at50:.1f})", end <= 1.25 * at50),
        (f"RSS after any request (max {peak:.1f} MB) <= warm {warm:.1f} MB + 200 ({warm + 200:.1f})", peak <= warm + 200),
        (f"failures among valid requests: {len(valid)}", not valid),
        (f"malformed requests not answered with a 4xx error object: {len(bad)}", not bad),
        (f"long prompts over {a.long_tokens - 200} tokens: {len(longs)} ({', '.join(x[3] for x in longs)})",
         len(longs) == a.long and not any(f[1] == "long" for f in r["fails"])),
    ]  # fmt: skip
    print(
        f"\n{len(series)} requests in {r['wall']:.0f} s: "
        + ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items()))
    )
    for f in r["fails"][:10]:
        print("  FAILED", f)
    for what, ok in checks:
        print(("PASS  " if ok else "FAIL  ") + what)
    return all(ok for _, ok in checks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", "-m", help="Bundle to serve (default: the default pack).")
    ap.add_argument("--url", help="Use a running server instead of starting one.")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--long", type=int, default=10, help="How many long prompts.")
    ap.add_argument(
        "--long-tokens", type=int, default=3200, help="A long prompt's least length, in tokens (+200)."
    )
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--every", type=int, default=25, help="Print RSS every N requests.")
    ap.add_argument("--json", type=Path, help="Write the RSS series here.")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that `finally` stops the server
    proc, url = (None, a.url) if a.url else start_server(a)
    try:
        wait_up(url, proc)
        r = soak(Soak(url, a), a)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:  # stuck in a long prefill: a job cannot stop mid-call
                proc.kill()
    if a.json:
        a.json.write_text(json.dumps({k: r[k] for k in ("warm", "series", "fails", "counts", "wall")}))
    return 0 if verdict(r, a) else 1


if __name__ == "__main__":
    sys.exit(main())
