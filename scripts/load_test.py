"""Load test for `edge-genarm serve`: concurrent clients, a mix of valid and malformed requests.

    .venv/bin/python scripts/load_test.py --weights BUNDLE [--requests 200] [--clients 8] [--max-tokens 32]

Starts the server as a subprocess on a free port (or uses --url), warms it up, then sends
--requests requests from --clients concurrent clients: streaming chats with the default
weights, chats with random per-request weights (some with log-probs), Ollama streaming
chats, and malformed bodies. Prints: failures among the valid requests, the status of every
malformed one (each must be a 4xx), server RSS after warm-up and after the run, per-request
decode speed against `edge-genarm generate` on the same prompt and seed (run alone, before the
server starts; also the same Engine.generate call warmed up, since a fresh process pays one-off
costs inside its first steps), and time to first token (with and without the queue wait).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
EXE = ROOT / ".venv" / "bin" / "edge-genarm"
PROMPTS = [
    "Write a short note to a friend who just moved to a new city.",
    "Describe a rainy Monday morning.",
    "Give me three tips for a job interview.",
    "What makes a good cup of tea?",
    "Tell me about lighthouses.",
]
SPEED_PROMPT, SPEED_SEED = PROMPTS[0], 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_speed(weights: str, max_tokens: int, runs: int) -> list[float]:
    """tok/s that `edge-genarm generate` reports for the speed prompt (decode steps only)."""
    out = []
    for _ in range(runs):
        cmd = [
            str(EXE),
            "generate",
            "-m",
            weights,
            SPEED_PROMPT,
            "-n",
            str(max_tokens),
            "--seed",
            str(SPEED_SEED),
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, check=True)
        m = re.search(r"\[(\d+) tokens, ([\d.]+) tok/s\]", p.stderr)
        out.append(float(m.group(2)))
    return out


WARM = """
import sys, time, edge_genarm
e = edge_genarm.load(sys.argv[1], n_ctx=int(sys.argv[3]))
e.generate(sys.argv[2], max_tokens=4, seed=0)  # warm-up: onnxruntime's first runs, lazy tables
for _ in range(int(sys.argv[5])):
    c = e.generate([{"role": "user", "content": sys.argv[2]}], max_tokens=int(sys.argv[4]), seed=int(sys.argv[6]))
    print(c.timings.summary()["tok_per_s"])
"""


def warm_speed(weights: str, max_tokens: int, runs: int, ctx: int) -> list[float]:
    """The same Engine.generate call that `generate` makes, after one warm-up request (as the server
    has had): the CLI's own figure includes one-off costs of a fresh process in its first steps."""
    cmd = [
        sys.executable,
        "-c",
        WARM,
        weights,
        SPEED_PROMPT,
        str(ctx),
        str(max_tokens),
        str(runs),
        str(SPEED_SEED),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return [float(x) for x in p.stdout.split()]


def request_mix(n: int, arms: list[str], model: str, max_tokens: int) -> list[dict]:
    """Deterministic mix: 45% streaming chats (default weights), 20% chats with random weights, 10%
    streaming with weights and log-probs, 10% Ollama streaming chats, 15% malformed."""
    rng = random.Random(0)
    bad_arm = {"weights": {"no-such-arm": 1.0}}
    nan = (
        b'{"messages": [{"role": "user", "content": "hi"}], "genarm": {"weights": {"'
        + (arms[0] if arms else "x").encode()
        + b'": NaN}}}'
    )
    malformed = [
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", b'{"messages": "hi"}'),
        (
            "/v1/chat/completions",
            json.dumps({"messages": [{"role": "user", "content": "hi"}], "genarm": bad_arm}).encode(),
        ),
        ("/v1/chat/completions", nan),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}'),
        ("/v1/chat/completions", b'{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "warm"}'),
        ("/api/chat", b'{"model": "x", "messages": 3}'),
        ("/v1/chat/completions", b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),  # nested too deeply
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800"}]}'),  # unpaired surrogate
        ("/v1/chat/completions", nan.replace(b"NaN", b"1e30")),  # an ARM weight past the range
    ]
    reqs = []
    for i in range(n):
        u = rng.random()
        prompt = rng.choice(PROMPTS)
        msgs = [{"role": "user", "content": prompt}]
        base = {"model": model, "messages": msgs, "max_tokens": max_tokens, "seed": rng.randrange(1000)}
        if u < 0.45:
            if i % 3 == 0:  # the speed prompt, as `generate` runs it
                base.update(messages=[{"role": "user", "content": SPEED_PROMPT}], seed=SPEED_SEED)
            reqs.append({"kind": "stream", "path": "/v1/chat/completions", "json": {**base, "stream": True}})
        elif u < 0.65:
            w = {a: round(rng.uniform(-0.5, 1.5), 2) for a in arms}
            reqs.append(
                {
                    "kind": "weights",
                    "path": "/v1/chat/completions",
                    "json": {**base, "genarm": {"weights": w}},
                }
            )
        elif u < 0.75:
            w = {a: round(rng.uniform(0, 1.5), 2) for a in arms}
            body = {**base, "stream": True, "logprobs": True, "top_logprobs": 3, "genarm": {"weights": w}}
            reqs.append({"kind": "stream+weights+logprobs", "path": "/v1/chat/completions", "json": body})
        elif u < 0.85:
            body = {
                "model": model,
                "messages": msgs,
                "options": {"num_predict": max_tokens, "seed": base["seed"]},
            }
            reqs.append({"kind": "ollama", "path": "/api/chat", "json": body})
        else:
            path, raw = malformed[i % len(malformed)]
            reqs.append({"kind": "malformed", "path": path, "raw": raw})
    return reqs


async def one(client: httpx.AsyncClient, req: dict) -> dict:
    res = {"kind": req["kind"], "ok": False, "status": None, "tokens": 0}
    t0 = time.perf_counter()
    try:
        if "raw" in req:
            r = await client.post(
                req["path"], content=req["raw"], headers={"content-type": "application/json"}
            )
            res["status"] = r.status_code
            res["ok"] = 400 <= r.status_code < 500 and "error" in r.json()
            return res
        if req["kind"] == "weights":
            r = await client.post(req["path"], json=req["json"])
            res["status"] = r.status_code
            body = r.json()
            res["ok"] = r.status_code == 200 and body["genarm"]["weights"] == {
                **body["genarm"]["weights"],
                **req["json"]["genarm"]["weights"],
            }
            res["tokens"] = body["usage"]["completion_tokens"]
            return res
        async with client.stream("POST", req["path"], json=req["json"]) as r:
            res["status"] = r.status_code
            times, done, timings = [], False, None
            async for line in r.aiter_lines():
                if req["kind"] == "ollama":
                    if not line:
                        continue
                    part = json.loads(line)
                    if part.get("message", {}).get("content"):
                        times.append(time.perf_counter())
                    if part.get("done"):
                        done, timings = True, part["genarm"]["timings"]
                    continue
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    times.append(time.perf_counter())
                if "timings" in chunk.get("genarm", {}):
                    timings = chunk["genarm"]["timings"]
            res["ok"] = r.status_code == 200 and done
            res["tokens"] = len(times)
            if times and timings:
                res["ttft"] = times[0] - t0
                res["ttft_engine"] = times[0] - t0 - timings["queue_s"]
                res["queue_s"] = timings["queue_s"]
                res["server_tps"] = timings["tok_per_s"]
                if len(times) > 2:
                    res["client_tps"] = (len(times) - 1) / (times[-1] - times[0])
                res["speed_prompt"] = (
                    req["json"].get("seed") == SPEED_SEED
                    and req["json"]["messages"][0]["content"] == SPEED_PROMPT
                    and "genarm" not in req["json"]
                )
    except Exception as e:  # noqa: BLE001 (a failure to report, not to hide)
        res["error"] = f"{type(e).__name__}: {e}"
    return res


async def run(url: str, reqs: list[dict], clients: int) -> list[dict]:
    queue: asyncio.Queue = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    results = []

    async def client_loop():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            while not queue.empty():
                results.append(await one(client, queue.get_nowait()))

    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return results


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def ab_test(weights: str, n: int, max_tokens: int, ctx: int) -> None:
    """Paired runs in one process, alternating: Engine.generate called directly, then the same
    request streamed through the server (uvicorn in a thread, same engine). Pairing cancels the
    drift of a shared machine's load; the ratio is the server's own cost per token."""
    import threading

    import uvicorn

    import edge_genarm
    from edge_genarm.server.app import create_app

    engine = edge_genarm.load(weights, n_ctx=ctx)
    app = create_app(engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    msgs = [{"role": "user", "content": SPEED_PROMPT}]
    body = {"messages": msgs, "max_tokens": max_tokens, "seed": SPEED_SEED, "stream": True}
    engine.generate(msgs, max_tokens=4, seed=0)
    direct, served, client = [], [], []
    for _ in range(n):
        direct.append(
            engine.generate(msgs, max_tokens=max_tokens, seed=SPEED_SEED).timings.summary()["tok_per_s"]
        )
        req = {"kind": "stream", "path": "/v1/chat/completions", "json": body}
        r = asyncio.run(run(url, [req], 1))[0]
        served.append(r["server_tps"])
        client.append(r["client_tps"])
    server.should_exit = True
    time.sleep(1)
    engine.close()
    ratio = [s / d for s, d in zip(served, direct)]
    cratio = [c / d for c, d in zip(client, direct)]
    print(f"paired A/B, {n} pairs, one client: direct Engine.generate median {statistics.median(direct):.1f} tok/s, "
          f"through the server {statistics.median(served):.1f} (engine) / {statistics.median(client):.1f} (client); "
          f"median paired ratio {statistics.median(ratio):.3f} (engine) / {statistics.median(cratio):.3f} (client)")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", "-m", required=True, help="Bundle to serve (and to run `generate` on).")
    ap.add_argument("--url", help="Use a running server instead of starting one.")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--generate-runs", type=int, default=3)
    ap.add_argument("--ab", type=int, default=0, help="Also N paired direct/served runs in one process.")
    a = ap.parse_args()

    if a.ab:
        ab_test(a.weights, a.ab, a.max_tokens, a.ctx)
    cli = generate_speed(a.weights, a.max_tokens, a.generate_runs)
    print(f"edge-genarm generate, same prompt and seed, alone: {', '.join(f'{x:.1f}' for x in cli)} tok/s")
    gen = warm_speed(a.weights, a.max_tokens, a.generate_runs, a.ctx)
    print(f"the same Engine.generate, warmed up, alone: {', '.join(f'{x:.1f}' for x in gen)} tok/s")
    proc, url = None, a.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [
            str(EXE),
            "serve",
            "-m",
            a.weights,
            "--port",
            str(port),
            "--ctx",
            str(a.ctx),
            "--max-queue",
            "16",
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open("/tmp/load_test_server.log", "w"))
    try:
        deadline = time.time() + 300
        while True:
            try:
                health = httpx.get(url + "/health", timeout=2).json()
                break
            except httpx.HTTPError:
                if time.time() > deadline or (proc and proc.poll() is not None):
                    print("the server did not start: see /tmp/load_test_server.log")
                    return 1
                time.sleep(0.5)
        models = httpx.get(url + "/v1/models").json()["data"]
        model, arms = models[0]["id"], list(models[0]["genarm"]["weights"])
        warm = request_mix(16, arms, model, a.max_tokens)
        asyncio.run(run(url, warm, a.clients))
        rss_warm = httpx.get(url + "/health").json()["rss_mb"]
        reqs = request_mix(a.requests, arms, model, a.max_tokens)
        t0 = time.perf_counter()
        res = asyncio.run(run(url, reqs, a.clients))
        wall = time.perf_counter() - t0
        health = httpx.get(url + "/health").json()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    after = warm_speed(
        a.weights, a.max_tokens, a.generate_runs, a.ctx
    )  # the machine may have changed meanwhile
    print(
        f"the same Engine.generate, warmed up, alone, after the run: {', '.join(f'{x:.1f}' for x in after)} tok/s"
    )
    report(res, gen + after, rss_warm, health, wall, a)
    return 0


def report(res, gen, rss_warm, health, wall, a) -> None:
    valid = [r for r in res if r["kind"] != "malformed"]
    bad = [r for r in res if r["kind"] == "malformed"]
    fails = [r for r in valid if not r["ok"]]
    print(f"{len(res)} requests from {a.clients} clients in {wall:.1f} s, max_tokens {a.max_tokens}")
    kinds = {}
    for r in res:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    print("  mix: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    print(f"valid requests: {len(valid)}, failures: {len(fails)}")
    for r in fails[:10]:
        print("  FAILED", r)
    statuses = {}
    for r in bad:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    print(f"malformed requests: {len(bad)}, statuses {statuses}, all 4xx with an error object: "
          f"{all(r['ok'] for r in bad)}")  # fmt: skip
    print(f"server RSS: {rss_warm:.1f} MB after warm-up, {health['rss_mb']:.1f} MB after the run "
          f"({health['rss_mb'] - rss_warm:+.1f} MB); queue now {health['waiting']} waiting")  # fmt: skip
    timed = [r for r in valid if "ttft" in r]
    speed = [r for r in timed if r.get("speed_prompt")]
    g = statistics.median(gen)
    if speed:
        s_srv = statistics.median(r["server_tps"] for r in speed)
        s_cli = statistics.median(r["client_tps"] for r in speed if "client_tps" in r)
        print(f"speed prompt ({len(speed)} streamed requests, default weights): engine {s_srv:.1f} tok/s, "
              f"as the client saw it {s_cli:.1f} tok/s; warm generate alone {g:.1f} tok/s (median, before+after) -> "
              f"{100 * (s_srv / g - 1):+.1f}% / {100 * (s_cli / g - 1):+.1f}%")  # fmt: skip
    for name, key in (("time to first token (incl. queue wait)", "ttft"), ("  of which after the queue", "ttft_engine"),
                      ("queue wait", "queue_s")):  # fmt: skip
        xs = [r[key] for r in timed]
        print(f"{name}: median {1e3 * statistics.median(xs):.0f} ms, p90 {1e3 * pct(xs, 0.9):.0f} ms, "
              f"max {1e3 * max(xs):.0f} ms")  # fmt: skip
    all_srv = [r["server_tps"] for r in timed]
    print(f"engine tok/s over all streamed requests: median {statistics.median(all_srv):.1f} "
          f"(min {min(all_srv):.1f}, max {max(all_srv):.1f})")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
