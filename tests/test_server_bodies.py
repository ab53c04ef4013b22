"""No 5xx from any request body: generated bodies thrown at the app in-process (Starlette's
TestClient over the real app and the tiny bundle). Whatever the body (JSON of any shape and
depth, strings with odd code points, numbers at the float limits, a wrong type in any field),
the answer is a 2xx or a 4xx with an error object carrying a message; a 503 only when the queue
is full. BODIES=2000 for a longer hunt; the count tried is printed (pytest -s)."""

from __future__ import annotations

import json
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_genarm.errors import ConfigError
from edge_genarm.guidance import MAX_WEIGHT
from edge_genarm.server.params import MAX_DEPTH

N = int(os.environ.get("BODIES", 150))
PROPS = settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck))
tried = {"bodies": 0, "5xx": 0, "by_status": {}}

OPENAI = ("/v1/chat/completions", "/v1/completions")
OLLAMA = ("/api/chat", "/api/generate", "/api/show")
MSG = [{"role": "user", "content": "Tell me about Mondays."}]
BASE = {
    "/v1/chat/completions": {"model": "tiny", "messages": MSG, "max_tokens": 2},
    "/v1/completions": {"model": "tiny", "prompt": "Mondays are", "max_tokens": 2},
    "/api/chat": {"model": "tiny", "messages": MSG, "stream": False, "options": {"num_predict": 2}},
    "/api/generate": {
        "model": "tiny",
        "prompt": "Mondays are",
        "stream": False,
        "options": {"num_predict": 2},
    },
    "/api/show": {"model": "tiny"},
}
# every field either API reads, as a path into the body
FIELDS = [
    ("model",), ("messages",), ("messages", 0), ("messages", 0, "role"), ("messages", 0, "content"),
    ("prompt",), ("max_tokens",), ("max_completion_tokens",), ("temperature",), ("top_p",), ("top_k",),
    ("min_p",), ("seed",), ("stop",), ("stream",), ("logprobs",), ("top_logprobs",), ("n",), ("user",),
    ("repeat_penalty",), ("repeat_last_n",), ("dry_multiplier",), ("dry_base",), ("dry_allowed_length",),
    ("dry_last_n",), ("stream_options",), ("stream_options", "include_usage"), ("response_format",),
    ("logit_bias",), ("tools",), ("echo",), ("best_of",), ("suffix",), ("frequency_penalty",),
    ("genarm",), ("genarm", "weights"), ("genarm", "weights", "alpha"), ("genarm", "weights", "beta"),
    ("genarm", "guidance"), ("genarm", "explain"), ("genarm", "nudge"), ("genarm", "nudge", "strength"),
    ("options",), ("options", "num_predict"), ("options", "temperature"), ("options", "seed"),
    ("options", "stop"), ("options", "top_k"), ("options", "repeat_penalty"), ("options", "genarm"),
    ("format",), ("raw",), ("system",), ("template",), ("images",), ("think",), ("name",),
]  # fmt: skip

# numbers at the edges of float64 and float32, as JSON can carry them (NaN/Infinity: Python's dialect)
EDGE_NUMBERS = [0, -0.0, 1, -1, 5e-324, 1e-45, 1.4e-45, 3.4e38, 3.5e38, 1e308, 1.7976931348623157e308, -1e308,
                2**31, 2**63, 2**64, -(2**63), 10**30, 10**400, -(10**400), math.inf, -math.inf, math.nan, 0.5, 1e-30, 100.0, 100.0001]  # fmt: skip
odd_text = st.text(st.characters(codec=None, categories=None), max_size=12)  # surrogates included
leaf = (
    st.none() | st.booleans() | st.sampled_from(EDGE_NUMBERS) | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | odd_text
)  # fmt: skip
any_json = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
    max_leaves=24,
)


def encode(body) -> bytes:
    """JSON as a client could send it: lone surrogates as \\ud800 escapes, NaN/Infinity literals."""
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


@pytest.fixture(scope="module")
def client(tiny_bundle):
    from starlette.testclient import TestClient

    from edge_genarm import load
    from edge_genarm.server.app import create_app

    engine = load(str(tiny_bundle), n_ctx=512)
    with TestClient(create_app(engine, name="tiny"), raise_server_exceptions=False) as c:
        yield c
    engine.close()
    print(
        f"\nbodies tried: {tried['bodies']}, 5xx (not queue-full): {tried['5xx']}, statuses: {tried['by_status']}"
    )


def check(client, path: str, raw: bytes):
    """Send `raw`; assert the answer is not a 5xx and an error carries a message."""
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    tried["bodies"] += 1
    tried["by_status"][r.status_code] = tried["by_status"].get(r.status_code, 0) + 1
    full = r.status_code == 503 and "busy" in r.text
    if r.status_code >= 500 and not full:
        tried["5xx"] += 1
    assert r.status_code < 500 or full, (path, raw[:300], r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        msg = err if path.startswith("/api/") else err["message"]
        assert isinstance(msg, str) and msg.strip(), (path, raw[:200], r.text[:200])
    elif '"stream":true' in raw.decode("ascii", "replace").replace(" ", ""):
        assert "generation failed" not in r.text, (path, raw[:300], r.text[-300:])  # no error mid-stream
    return r


def put(body, path: tuple, value):
    """`body` with the field at `path` set to `value` (missing objects on the way are created)."""
    body = json.loads(json.dumps(body))
    node = body
    for k in path[:-1]:
        if isinstance(node, list):
            node = node[k]
            continue
        if not isinstance(node.get(k), (dict, list)):
            node[k] = {}
        node = node[k]
    node[path[-1]] = value
    return body


@PROPS
@given(path=st.sampled_from(OPENAI + OLLAMA), body=any_json)
def test_any_json_gets_no_5xx(client, path, body):
    check(client, path, encode(body))


@PROPS
@given(path=st.sampled_from(OPENAI + OLLAMA), field=st.sampled_from(FIELDS), value=any_json)
def test_any_value_in_any_field_gets_no_5xx(client, path, field, value):
    check(client, path, encode(put(BASE[path], field, value)))


@PROPS
@given(path=st.sampled_from(OPENAI[:1] + OLLAMA[:1]), field=st.sampled_from(FIELDS), num=st.sampled_from(EDGE_NUMBERS),
       stream=st.booleans())  # fmt: skip
def test_numbers_at_the_float_limits_in_any_field(client, path, field, num, stream):
    body = put(BASE[path], field, num)
    body["stream"] = stream
    check(client, path, encode(body))


@PROPS
@given(
    path=st.sampled_from(OPENAI + OLLAMA), depth=st.integers(MAX_DEPTH, 200_000), opener=st.sampled_from("[{")
)
def test_nesting_of_any_depth(client, path, depth, opener):
    inner = "[" * depth + "]" * depth if opener == "[" else '{"a":' * depth + "1" + "}" * depth
    r = check(client, path, ('{"model": "tiny", "messages": ' + inner + "}").encode())
    assert r.status_code == 400


@PROPS
@given(path=st.sampled_from(OPENAI + OLLAMA), text=odd_text)
def test_strings_with_odd_code_points(client, path, text):
    field = ("messages", 0, "content") if "chat" in path else ("prompt",)
    r = check(client, path, encode(put(BASE[path], field, text)))
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        assert r.status_code == 400 and "unpaired surrogate" in r.text


def test_named_cases(client):
    """The three bodies that ended in a 500, now each a 400 naming what is wrong."""
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = check(client, "/v1/chat/completions", deep)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    r = check(client, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
    for w in (1e30, -1e300, 3e38, 101, -100.5, 10**400):
        body = put(BASE["/v1/chat/completions"], ("genarm", "weights", "alpha"), w)
        r = check(client, "/v1/chat/completions", encode(body))
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("genarm.weights"), (w, r.text)
    for w in (100, -100, 2.5):
        r = check(client, "/v1/chat/completions", encode(put(BASE["/v1/chat/completions"], ("genarm", "weights",
                                                                                              "alpha"), w)))  # fmt: skip
        assert r.status_code == 200, r.text
    minus = {
        "genarm": {"weights": {"alpha": -3, "beta": -3}}
    }  # positive scores: where s / penalty overflowed
    for k, v in (("temperature", 5e-324), ("repeat_penalty", 1e-45), ("dry_base", 1e308), ("top_p", 10**400)):
        r = check(client, "/v1/chat/completions", encode({**BASE["/v1/chat/completions"], **minus, k: v}))
        assert r.status_code == 400 and r.json()["error"]["param"] == k, (k, r.text)
    r = check(client, "/v1/chat/completions", encode(put(BASE["/v1/chat/completions"], ("genarm", "nudge"),
                                                         {"strength": 10**200})))  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "genarm.nudge.strength", r.text
    r = check(client, "/v1/chat/completions", b'{"max_tokens": 1' + b"0" * 5000 + b"}")
    assert r.status_code == 400 and "number" in r.json()["error"]["message"]
    assert tried["5xx"] == 0 and tried["bodies"] >= N


def test_the_python_api_refuses_an_extreme_weight(engine):
    for w in (1e30, MAX_WEIGHT * 1.01, -1e6, float("inf"), 10**400):
        with pytest.raises(ConfigError, match=r"ARM weight for 'alpha'"):
            engine.generate("Hi", max_tokens=2, weights={"alpha": w})
    assert engine.generate("Hi", max_tokens=2, seed=0, weights={"alpha": MAX_WEIGHT}).tokens
