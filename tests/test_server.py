"""`edge-genarm serve` against its real clients: the official openai and ollama packages, raw
httpx for malformed bodies, raw sockets for disconnects, and Chromium (Playwright) for the
page. The server is a real uvicorn on a free port, serving the tiny random bundle; answers
are checked against a second engine run directly (same seeds, same weights)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

CTX = 1024
HI = [{"role": "user", "content": "Tell me about Mondays."}]
SAMPLE = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}  # plain sampling: the full distribution


@contextlib.contextmanager
def running(app):
    """uvicorn in a thread on a free port; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def served(tiny_bundle, **kw):
    from edge_genarm import load
    from edge_genarm.server.app import create_app

    engine = load(str(tiny_bundle), n_ctx=CTX)
    return engine, create_app(engine, name="tiny", **kw)


@pytest.fixture(scope="module")
def server(tiny_bundle):
    engine, app = served(tiny_bundle, max_queue=16)
    with running(app) as url:
        yield SimpleNamespace(url=url, state=app.state, engine=engine, sched=app.state.scheduler)
    engine.close()


@pytest.fixture(scope="module")
def ref(tiny_bundle):
    """The same bundle run directly: what the server must answer."""
    from edge_genarm import load

    engine = load(str(tiny_bundle), n_ctx=CTX)
    yield engine
    engine.close()


@pytest.fixture
def oai(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(server, timeout=60, **body) -> httpx.Response:
    body = {"model": "tiny", "messages": HI, "max_tokens": 12, **body}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=timeout)


def wait_for(cond, timeout=20.0, what="condition"):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def job_of(server, user):
    return next((j for j in reversed(server.sched.history) if j.user == user), None)


# ---------------------------------------------------------------------------
# the openai client
# ---------------------------------------------------------------------------


def test_models_list_the_presets(oai, server):
    ids = [m.id for m in oai.models.list().data]
    assert ids == ["tiny", "tiny+alpha", "tiny+beta", "tiny+base"]
    alpha = oai.models.retrieve("tiny+alpha")
    assert alpha.model_extra["genarm"]["weights"] == {"alpha": 1.0, "beta": 0.0}


def test_chat_and_stream_give_the_engine_text(oai, ref):
    kw = dict(model="tiny", messages=HI, max_tokens=12, seed=5, temperature=0.9)
    c = oai.chat.completions.create(**kw)
    want = ref.generate(HI, max_tokens=12, seed=5, temperature=0.9)
    assert c.choices[0].message.content == want.text and c.choices[0].finish_reason == want.finish_reason
    assert (
        c.usage.completion_tokens == len(want.tokens) and c.usage.prompt_tokens == want.timings.prompt_tokens
    )
    assert c.model_extra["genarm"]["weights"] == {"alpha": 1.0, "beta": 1.0}  # the bundle's defaults
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.tokens)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == want.finish_reason
    empty = list(oai.chat.completions.create(**{**kw, "max_tokens": 0}, stream=True))
    assert empty[0].choices[0].delta.role == "assistant" and empty[-1].choices[0].finish_reason == "length"


def test_extra_body_weights_change_the_output_and_are_echoed(oai, ref, server):
    kw = dict(model="tiny", messages=HI, max_tokens=12, seed=3)
    texts = {}
    for w in ({"alpha": 0.0, "beta": 0.0}, {"alpha": 3.0}, {"beta": -1.5}):
        c = oai.chat.completions.create(**kw, extra_body={"genarm": {"weights": w}})
        used = {"alpha": 1.0, "beta": 1.0} | w
        assert c.model_extra["genarm"]["weights"] == used
        assert c.choices[0].message.content == ref.generate(HI, max_tokens=12, seed=3, weights=w).text
        texts[json.dumps(w)] = c.choices[0].message.content
    assert len(set(texts.values())) == 3, texts  # the weights change what a fixed seed gives
    # a request's weights reach neither the next request nor the server's defaults
    after = oai.chat.completions.create(**kw)
    assert after.model_extra["genarm"]["weights"] == {"alpha": 1.0, "beta": 1.0}
    assert server.engine.weights == {"alpha": 1.0, "beta": 1.0}
    # a preset chosen as the model, and guidance off
    solo = oai.chat.completions.create(**{**kw, "model": "tiny+alpha"})
    assert (
        solo.choices[0].message.content == ref.generate(HI, max_tokens=12, seed=3, weights={"beta": 0}).text
    )
    base = oai.chat.completions.create(**{**kw, "model": "tiny+base"})
    assert base.choices[0].message.content == ref.generate(HI, max_tokens=12, seed=3, guidance=False).text
    assert base.model_extra["genarm"]["active"] == []


def test_bad_requests_raise_bad_request_error_with_the_message(oai):
    import openai

    kw = dict(model="tiny", messages=HI, max_tokens=4)
    cases = [
        ({"extra_body": {"genarm": {"weights": {"gamma": 1.0}}}}, "unknown ARM 'gamma'"),
        ({"extra_body": {"genarm": {"weights": {"alpha": "high"}}}}, "must be a finite number"),
        ({"extra_body": {"genarm": {"explain": "yes"}}}, "'genarm.explain' must be true or false"),
        ({"max_tokens": -1}, "'max_tokens' must be an integer >= 0"),
        ({"n": 2}, "'n' > 1 is not supported"),
        ({"temperature": -0.5}, "temperature must be in"),
        ({"logprobs": False, "top_logprobs": 3}, "needs 'logprobs': true"),
        ({"messages": [{"role": "user", "content": "word " * 1500}]}, "context holds 1024"),
    ]
    for extra, msg in cases:
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(**{**kw, **extra})
        assert msg in e.value.message, (extra, e.value.message)
        assert e.value.status_code == 400
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' does not exist: this server has tiny"):
        oai.chat.completions.create(**{**kw, "model": "gpt-4"})


def test_logprobs_come_from_the_sampled_distribution(oai, ref):
    # plain sampling at temperature 1, guidance off: the sampled distribution is the base's own
    c = oai.chat.completions.create(model="tiny+base", messages=HI, max_tokens=6, seed=2, logprobs=True,
                                    top_logprobs=3, extra_body=SAMPLE)  # fmt: skip
    want = ref.generate(HI, max_tokens=6, seed=2, guidance=False, **SAMPLE)
    got = c.choices[0].logprobs.content
    np.testing.assert_allclose([t.logprob for t in got], [r.base_logprob for r in want.records], atol=2e-5)
    # with both ARMs: the combined scores' log-softmax (the records' combined_logprob)
    c = oai.chat.completions.create(model="tiny", messages=HI, max_tokens=6, seed=2, logprobs=True,
                                    top_logprobs=2, extra_body=SAMPLE)  # fmt: skip
    want = ref.generate(HI, max_tokens=6, seed=2, **SAMPLE)
    got = c.choices[0].logprobs.content
    np.testing.assert_allclose(
        [t.logprob for t in got], [r.combined_logprob for r in want.records], atol=2e-5
    )
    for t in got:  # the two best alternatives, best first
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 2 and tops[0] >= tops[1] and t.logprob <= tops[0] + 1e-6
    # truncated (top-k 4, temperature 0.5): the distribution over the 4 candidates sums to 1
    c = oai.chat.completions.create(model="tiny", messages=HI, max_tokens=5, seed=2, logprobs=True,
                                    top_logprobs=20, temperature=0.5, top_p=1.0, extra_body={"top_k": 4, "min_p": 0})  # fmt: skip
    for t in c.choices[0].logprobs.content:
        assert len(t.top_logprobs) == 4 and t.token in [x.token for x in t.top_logprobs]
        assert sum(math.exp(x.logprob) for x in t.top_logprobs) == pytest.approx(1.0, abs=1e-5)


def test_explain_marks_what_guidance_changed(server, ref):
    r = chat(server, seed=4, max_tokens=10, genarm={"weights": {"alpha": 4.0}, "explain": True}).json()
    items = r["genarm"]["explain"]
    unguided = ref.generate(HI, max_tokens=1, seed=4, guidance=False)
    assert items[0]["base_pick"]["id"] == unguided.tokens[0]  # the base's pick with the same uniform
    for it in items:
        assert set(it["arm_terms"]) == {"alpha", "beta"}
        assert (it["changed"] == "guidance") == (it["base_pick"]["id"] != it["id"])
    assert any(it["changed"] == "guidance" for it in items)
    off = chat(server, seed=4, model="tiny+base", genarm={"explain": True}).json()["genarm"]["explain"]
    assert all(it["changed"] is None and it["arm_terms"] == {} for it in off)
    nudged = chat(server, seed=4, genarm={"nudge": {"tau": 0.0, "min_gap": 1}, "explain": True}).json()
    assert nudged["genarm"]["nudge"]["sites"] == 12
    changed = [it for it in nudged["genarm"]["explain"] if it["changed"] == "nudge"]
    assert len(changed) == nudged["genarm"]["nudge"]["changed"]


def test_completions_endpoint(oai, ref):
    c = oai.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, seed=1, logprobs=2)
    want = ref.generate("Once upon a time", raw=True, max_tokens=8, seed=1)
    assert c.choices[0].text == want.text and len(c.choices[0].logprobs.tokens) == len(want.tokens)
    streamed = "".join(ch.choices[0].text for ch in oai.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=8, seed=1, stream=True))  # fmt: skip
    assert streamed == want.text
    ids = ref.base.tokenize("Once upon a time")
    assert oai.completions.create(model="tiny", prompt=ids, max_tokens=8, seed=1).choices[0].text == want.text


def test_chat_turns_reuse_the_kv_cache(server):
    first = chat(server, seed=9, max_tokens=16).json()
    turn2 = HI + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                  {"role": "user", "content": "And Tuesdays?"}]  # fmt: skip
    t = chat(server, seed=9, messages=turn2).json()["genarm"]["timings"]
    # turn 1's prompt comes from the cache; its reply (decoded one token at a time) and the new
    # turn are evaluated in one batch (see Engine._trim_for)
    assert t["prompt_evaluated"] <= t["prompt_tokens"] - first["usage"]["prompt_tokens"] + 2
    assert t["prompt_evaluated"] >= t["prompt_tokens"] - first["usage"]["prompt_tokens"] - 2
    # the same request again: with a seed, two tokens are evaluated again (a one-token evaluation
    # rounds differently); without one, everything cached is reused and one token is evaluated
    again = [
        chat(server, messages=turn2, seed=9).json()["genarm"]["timings"]["prompt_evaluated"] for _ in "ab"
    ]
    assert again == [2, 2]
    again = [chat(server, messages=turn2).json()["genarm"]["timings"]["prompt_evaluated"] for _ in "ab"]
    assert again[1] == 1


def test_one_log_line_per_request(server, caplog):
    def lines():
        return [r.getMessage() for r in caplog.records if r.name == "edge_genarm.server"]

    def mine():  # a slow earlier test's request may log inside this window too: pick ours
        ls = lines()
        ok = [s for s in ls if s.startswith("POST /v1/chat/completions 200 ") and "'alpha': 0.5" in s]
        bad = [s for s in ls if s.startswith("POST /v1/chat/completions 400 ") and "max_tokens" in s]
        return ok, bad

    with caplog.at_level(logging.INFO, logger="edge_genarm.server"):
        chat(server, seed=1, max_tokens=3, genarm={"weights": {"alpha": 0.5}})
        chat(server, max_tokens=-3)
        wait_for(lambda: all(mine()), what="the two requests' log lines")
        time.sleep(0.2)  # a second line for either request would show up by now
    (ok,), (bad,) = mine()  # one line per request
    assert "tokens=3 tok/s=" in ok
    assert "weights={'alpha': 0.5, 'beta': 1.0}" in ok and "queue_wait=" in ok
    assert bad.startswith("POST /v1/chat/completions 400 ") and "'max_tokens' must be an integer >= 0" in bad


# ---------------------------------------------------------------------------
# the ollama client
# ---------------------------------------------------------------------------


def test_ollama_client(server, ref):
    import ollama

    client = ollama.Client(host=server.url)
    assert [m.model for m in client.list().models] == ["tiny", "tiny+alpha", "tiny+beta", "tiny+base"]
    assert "im_start" in client.show("tiny").template
    opts = {"seed": 6, "num_predict": 10, "temperature": 0.7, "repeat_penalty": 1.1}
    want = ref.generate(HI, max_tokens=10, seed=6, temperature=0.7, repeat_penalty=1.1)
    r = client.chat(model="tiny", messages=HI, options=opts)
    assert r.message.content == want.text and r.eval_count == len(want.tokens) and r.done_reason == "length"
    parts = list(client.chat(model="tiny", messages=HI, options=opts, stream=True))
    assert "".join(p.message.content for p in parts) == want.text and parts[-1].done
    g = client.generate(model="tiny", prompt="Tell me about Mondays.", options=opts)
    assert g.response == want.text
    steered = client.chat(model="tiny", messages=HI, options={**opts, "genarm": {"weights": {"alpha": 3.0}}})
    assert steered.message.content == ref.generate(HI, max_tokens=10, seed=6, temperature=0.7,
                                                   repeat_penalty=1.1, weights={"alpha": 3.0}).text  # fmt: skip
    assert steered.message.content != want.text
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="llama3", messages=HI)
    assert e.value.status_code == 404 and "model 'llama3' does not exist" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="tiny", messages=HI, options={"mirostat_tau": 5.0})
    assert e.value.status_code == 400 and "option 'mirostat_tau' is not supported" in e.value.error


# ---------------------------------------------------------------------------
# malformed bodies (raw httpx): always a 4xx with the error object, never a 500
# ---------------------------------------------------------------------------


def test_malformed_bodies_get_4xx_error_objects(server):
    url = server.url
    raw = [
        ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/chat/completions", b"\xff\xfe", 400, "not UTF-8"),
        ("/v1/chat/completions", b"[1, 2]", 400, "must be a JSON object"),
        ("/v1/chat/completions", b'{"model": "tiny"}', 400, "'messages' must be a non-empty array"),
        ("/v1/chat/completions", b'{"messages": "hi"}', 400, "'messages' must be a non-empty array"),
        ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "x"}]}', 400, "'messages[0].role'"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400, "'messages[0].content'"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400,
         "text only"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400,
         "'temperature' must be a finite number"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "top_k": -1}', 400, "'top_k'"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "seed": "abc"}', 400, "'seed'"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "stop": 5}', 400, "'stop'"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "genarm": [1]}', 400, "'genarm'"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "genarm": {"weight": {}}}', 400,
         "unknown key 'genarm.weight'"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "genarm": {"weights": {"alpha": NaN}}}',
         400, "finite"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "genarm": {"nudge": {"mode": "x"}}}',
         400, "nudge mode"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "tools": [{}]}', 400, "tools"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "model": 7}', 400, "'model'"),
        ("/v1/completions", b'{"prompt": ["a", "b"]}', 400, "one prompt per request"),
        ("/v1/completions", b'{"prompt": [1, 99999999]}', 400, "outside the vocabulary"),
        ("/v1/chat/completions", b"x" * (5 << 20), 413, "over 4194304 bytes"),
        ("/v1/nothing", b"{}", 404, "no such endpoint"),
    ]  # fmt: skip
    for path, body, status, msg in raw:
        r = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, (path, body[:80], r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and msg in err["message"], (body[:80], err)
    r = httpx.post(url + "/api/chat", content=b'{"model": "tiny", "messages": 3}', timeout=30,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and "'messages' must be an array" in r.json()["error"]  # Ollama's shape
    r = httpx.get(url + "/v1/chat/completions", timeout=30)
    assert r.status_code == 405 and r.json()["error"]["message"]
    assert httpx.get(url + "/health").json()["status"] == "ok"  # and the server is still up


# ---------------------------------------------------------------------------
# concurrency: determinism, disconnects, the queue
# ---------------------------------------------------------------------------


def test_same_seed_same_text_alone_and_among_concurrent_requests(server):
    req = dict(seed=11, max_tokens=10, temperature=1.0)
    turn2 = HI + [{"role": "assistant", "content": "Mondays are"}, {"role": "user", "content": "Go on."}]
    alone = chat(server, **req).json()["choices"][0]["message"]["content"]
    alone2 = chat(server, messages=turn2, **req).json()["choices"][0]["message"]["content"]
    others = [dict(messages=[{"role": "user", "content": f"Something else {i}"}], seed=i, max_tokens=6)
              for i in range(3)]  # fmt: skip
    mix = [req, others[0], req, dict(req, genarm={"weights": {"alpha": 2.0}}), dict(messages=turn2, **req),
           others[1], dict(messages=turn2, **req), req, others[2]]  # fmt: skip
    with ThreadPoolExecutor(max_workers=len(mix)) as pool:
        got = list(pool.map(lambda b: chat(server, **b).json()["choices"][0]["message"]["content"], mix))
    assert [got[i] for i in (0, 2, 7)] == [alone] * 3
    assert [got[i] for i in (4, 6)] == [alone2] * 2
    assert got[3] != alone


def _stream(server, user, max_tokens=900, **kw):
    body = {"model": "tiny", "messages": HI, "max_tokens": max_tokens, "stream": True, "user": user, **kw}
    return httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60)


@contextlib.contextmanager
def holding(server, user):
    """A long streaming request, read until it has produced a token, then dropped."""
    with _stream(server, user) as r:
        lines = r.iter_lines()
        next(line for line in lines if '"content":"' in line and '"role"' not in line)
        yield
    wait_for(lambda: server.sched.running is None, what="the engine to be free")


def test_disconnect_stops_the_generation_within_a_token(server):
    with _stream(server, "leaves") as r:
        n = 0
        for line in r.iter_lines():
            n += '"content":"' in line and '"role"' not in line
            if n == 3:
                break
    t0 = time.time()
    wait_for(lambda: (j := job_of(server, "leaves")) is not None and j.status != "running", what="the cancel")
    job = job_of(server, "leaves")
    assert job.status == "cancelled" and job.steps < 900
    assert job.steps - job.steps_at_cancel <= 1  # the worker stopped within one token of hearing it
    assert time.time() - t0 < 5
    assert chat(server, seed=1, max_tokens=4).status_code == 200  # and the next request runs at once


def _raw_request(server, body: dict) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(data) + data)  # fmt: skip
    return s


def test_a_request_cancelled_while_queued_never_runs(server):
    dropped = server.sched.dropped
    with holding(server, "holder"):
        s = _raw_request(
            server, {"model": "tiny", "messages": HI, "max_tokens": 5, "user": "queued", "stream": True}
        )
        wait_for(lambda: server.sched.waiting == 1, what="the request to queue")
        s.close()
        wait_for(lambda: server.sched.waiting == 0, what="the request to leave the queue")
        assert server.sched.dropped == dropped + 1
    job = job_of(server, "queued")
    assert job.status == "dropped" and job.steps == 0 and job.steps_at_cancel is None
    assert job_of(server, "holder").status == "cancelled"


def test_queue_full_is_a_503_with_retry_after(server):
    old, server.sched.max_queue = server.sched.max_queue, 1
    try:
        with holding(server, "holder2"):
            s = _raw_request(server, {"model": "tiny", "messages": HI, "max_tokens": 2, "user": "waiter"})
            wait_for(lambda: server.sched.waiting == 1, what="the request to queue")
            r = chat(server, max_tokens=2)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert (
                r.json()["error"]["code"] == "queue_full" and "--max-queue 1" in r.json()["error"]["message"]
            )
            r = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": "x"}, timeout=30)
            assert r.status_code == 503 and "busy" in r.json()["error"]
            s.close()
    finally:
        server.sched.max_queue = old


# ---------------------------------------------------------------------------
# the API key
# ---------------------------------------------------------------------------


def test_api_key(tiny_bundle):
    import ollama
    import openai

    engine, app = served(tiny_bundle, api_key="sekret")
    try:
        with running(app) as url:
            with pytest.raises(openai.AuthenticationError, match="the API key is wrong"):
                openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
            r = httpx.post(url + "/v1/chat/completions", json={"messages": HI})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
            ok = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
            assert (
                ok.chat.completions.create(model="tiny", messages=HI, max_tokens=3).choices[0].message.content
            )
            with pytest.raises(ollama.ResponseError) as e:
                ollama.Client(host=url).list()
            assert e.value.status_code == 401
            assert ollama.Client(host=url, headers={"Authorization": "Bearer sekret"}).list().models
            assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/").status_code == 200
    finally:
        engine.close()


# ---------------------------------------------------------------------------
# the page, in a real browser
# ---------------------------------------------------------------------------

def test_page_in_chromium(server, tmp_path, chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 620})
            page.goto(server.url + "/")
            page.wait_for_selector("input.weight[data-arm=beta]")
            page.fill("input.weight[data-arm=alpha]", "2.5")  # move a slider
            assert page.inner_text("#v-alpha") == "2.50"
            page.fill("#max", "16")
            page.fill("#msg", "Tell me about Mondays.")
            with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as req:
                page.click("#send")
            sent = req.value.post_data_json
            assert sent["genarm"]["weights"] == {"alpha": 2.5, "beta": 1.0} and sent["stream"] is True
            page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=30000)
            reply = page.inner_text(".msg.reply .body")
            job = server.sched.history[-1]
            assert reply.strip() and job.gen.weights == {"alpha": 2.5, "beta": 1.0}  # the server used them
            assert page.locator(".msg.reply .tok").count() == job.steps  # one explained span per token
            assert "alpha=2.5" in page.inner_text(".msg.reply .meta")
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()


# ---------------------------------------------------------------------------
# memory that comes back, and the count of generations started
# ---------------------------------------------------------------------------


def test_a_long_prompt_leaves_no_memory_behind(server):
    """A ~700-token prompt made onnxruntime's arena keep ~320 MB (the prefill's [seq, vocab] logits
    of both ARMs) for good; without the arena, and with malloc_trim after the job, it comes back."""
    words = "the morning river window garden letter market winter friend station music paper".split()
    long = " ".join(words[i * 7 % len(words)] + str(i % 10) for i in range(300))
    assert chat(server, max_tokens=2).status_code == 200
    before = httpx.get(server.url + "/health").json()
    r = chat(server, messages=[{"role": "user", "content": long}], max_tokens=2)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 500
    after = httpx.get(server.url + "/health").json()
    assert after["started"] == before["started"] + 1
    assert after["trims"] == before["trims"] + 1 and after["trim_ms"] >= 0
    assert after["rss_mb"] - before["rss_mb"] < 60, (before["rss_mb"], after["rss_mb"])
