"""A local server that a web page cannot drive (server/gate.py): Host and Origin checks, JSON
content type, and CORS for the origins allowed with --allow-origin. The attacks run in a real
Chromium: a page served from a second local port tries a text/plain fetch, a JSON fetch and a
form post; the server's count of started generations shows that none got through, and the same
page, once allowed, gets its reply."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading

import httpx
import pytest

from .test_server import HI, running, served

ATTACK = """<!doctype html><meta charset="utf-8"><title>a page from elsewhere</title>
<iframe name="sink"></iframe>
<script>
const REQ = {model: "tiny", messages: [{role: "user", content: "Tell me about Mondays."}], max_tokens: 3};
async function attempt(kind, target) {
  const url = target + "/v1/chat/completions";
  try {
    if (kind === "text") {  // a "simple" request: no preflight, the body is JSON all the same
      await fetch(url, {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                        body: JSON.stringify(REQ)});
      return "sent";
    }
    if (kind === "json") {  // needs a preflight; when allowed, the page reads the reply
      const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                                  body: JSON.stringify(REQ)});
      const j = await r.json();
      return r.status + ":" + (j.choices ? "reply" : (j.error && j.error.code));
    }
    // a form post with enctype text/plain: name + "=" + value spells a JSON body
    const f = document.createElement("form");
    f.method = "POST"; f.action = url; f.enctype = "text/plain"; f.target = "sink";
    const i = document.createElement("input");
    const s = JSON.stringify({...REQ, pad: ""});
    i.name = s.slice(0, -2); i.value = s.slice(-2);
    f.appendChild(i); document.body.appendChild(f); f.submit();
    return "submitted";
  } catch (e) {
    return "blocked: " + e.message;
  }
}
</script>"""


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def static_site(folder):
    """A plain file server on another free loopback port: the foreign page's origin."""
    handler = functools.partial(Quiet, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("site")
    (folder / "attack.html").write_text(ATTACK)
    with static_site(folder) as url:
        yield url


@contextlib.contextmanager
def serving(tiny_bundle, **kw):
    engine, app = served(tiny_bundle, **kw)
    try:
        with running(app) as url:
            yield url, app.state.scheduler
    finally:
        engine.close()


def drive(chromium, page_url: str, target: str, sched, kinds=("text", "json", "form")) -> dict:
    """Open the foreign page and try each attack on `target`; what the page saw, what the server
    answered (status per request as the browser saw it) and how many generations started."""
    from playwright.sync_api import sync_playwright

    before, out = sched.started, {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            statuses = []
            page.on("response", lambda r: statuses.append((r.request.method, r.status))
                    if r.url.startswith(target) else None)  # fmt: skip
            page.goto(page_url + "/attack.html")
            for kind in kinds:
                with page.expect_response(lambda r: r.url.startswith(target) and r.request.method == "POST",
                                          timeout=30000) if kind != "json" else contextlib.nullcontext():  # fmt: skip
                    out[kind] = page.evaluate("([k, t]) => attempt(k, t)", [kind, target])
            page.wait_for_timeout(300)  # let the form's navigation land
            out["statuses"] = statuses
        finally:
            browser.close()
    out["started"] = sched.started - before
    return out


def test_a_foreign_page_starts_no_generation(chromium, site, tiny_bundle):
    with serving(tiny_bundle) as (url, sched):
        assert (
            httpx.post(url + "/v1/chat/completions", json={"messages": HI, "max_tokens": 2}).status_code
            == 200
        )
        assert sched.started == 1  # the count moves for a request that does run
        got = drive(chromium, site, url, sched)
        health = httpx.get(url + "/health").json()
    print("foreign page:", got)
    assert got["started"] == 0 and health["started"] == 1, got
    assert got["text"] == "sent" and got["form"] == "submitted"  # the browser did send them...
    assert got["json"].startswith("blocked"), got  # ...and refused the preflighted one
    assert ("POST", 403) in got["statuses"] and all(s == 403 for _, s in got["statuses"]), got


def test_the_same_page_allowed_with_allow_origin_works(chromium, site, tiny_bundle):
    with serving(tiny_bundle, allow_origins=[site]) as (url, sched):
        got = drive(chromium, site, url, sched)
    print("allowed page:", got)
    assert got["json"] == "200:reply" and got["started"] == 1, got  # only the JSON request runs
    # the preflight (answered 204, see test_preflight_only_for_allowed_origins) is not shown to the page;
    # the text/plain fetch and the form reach the server, which refuses their bodies (not JSON)
    assert sorted(got["statuses"]) == [("POST", 200), ("POST", 415), ("POST", 415)], got


# ---------------------------------------------------------------------------
# the same rules over plain HTTP
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url(tiny_bundle):
    with serving(tiny_bundle, allow_origins=["http://app.example:3000"]) as (u, sched):
        yield u


def post(url, headers=None, body=None, path="/v1/chat/completions"):
    h = {"content-type": "application/json", **(headers or {})}
    return httpx.post(url + path, content=body or b'{"messages": [{"role": "user", "content": "x"}], '
                      b'"max_tokens": 1}', headers=h, timeout=30)  # fmt: skip


def test_host_must_be_loopback_on_a_loopback_address(url):
    port = url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "192.168.1.5", "127.0.0.1.evil.example", "[::2]"):
        r = post(url, {"host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_host", (host, r.text)
        assert "DNS-rebinding" in r.json()["error"]["message"]
    for host in (
        f"localhost:{port}",
        "localhost",
        f"127.0.0.1:{port}",
        "127.8.9.1",
        f"[::1]:{port}",
        "app.localhost",
    ):
        assert post(url, {"host": host}).status_code == 200, host
    r = httpx.get(url + "/health", headers={"host": "evil.example"})
    assert r.status_code == 403  # every path, not only the APIs


def test_origin_must_be_own_loopback_or_allowed(url):
    port = url.rsplit(":", 1)[1]
    own = [url, f"http://localhost:{port}", f"http://[::1]:{port}", "http://app.example:3000"]
    for origin in own:
        r = post(url, {"origin": origin})
        assert r.status_code == 200, (origin, r.text)
    assert post(url, {"origin": "http://app.example:3000"}).headers["access-control-allow-origin"] == (
        "http://app.example:3000"
    )
    assert "access-control-allow-origin" not in post(url, {"origin": url}).headers
    for origin in ("https://evil.example", "http://127.0.0.1:1", "null", f"https://127.0.0.1:{port}",
                   "http://app.example:3001", "file://", "garbage"):  # fmt: skip
        r = post(url, {"origin": origin})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin", (origin, r.text)
        assert "--allow-origin" in r.json()["error"]["message"]
    r = httpx.post(
        url + "/api/generate", json={"model": "tiny", "prompt": "x"}, headers={"origin": "https://e.x"}
    )
    assert r.status_code == 403 and "--allow-origin" in r.json()["error"]  # Ollama's error shape


def test_preflight_only_for_allowed_origins(url):
    ask = {"access-control-request-method": "POST", "access-control-request-headers": "content-type"}
    r = httpx.options(url + "/v1/chat/completions", headers={"origin": "http://app.example:3000", **ask})
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "http://app.example:3000"
    assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.options(url + "/v1/chat/completions", headers={"origin": "https://evil.example", **ask})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers


def test_json_endpoints_take_only_json(url):
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        h = {"content-type": kind} if kind else {}
        r = httpx.post(url + "/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "x"}]}',
                       headers=h)  # fmt: skip
        assert r.status_code == 415, (kind, r.text)
        assert "Content-Type: application/json" in r.json()["error"]["message"]
    r = httpx.post(
        url + "/api/chat",
        content=b'{"model": "tiny", "messages": []}',
        headers={"content-type": "text/plain"},
    )
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    assert post(url, {"content-type": "application/json; charset=utf-8"}).status_code == 200


def test_origins_from_the_environment(tiny_bundle, monkeypatch):
    from edge_genarm.server.gate import allowed_origins

    monkeypatch.setenv("EDGE_GENARM_ORIGINS", "http://a.example:1, https://B.example/ ,")
    assert allowed_origins(["http://c.example"]) == (
        "http://c.example",
        "http://a.example:1",
        "https://b.example",
    )
    with serving(tiny_bundle) as (u, _):
        assert post(u, {"origin": "https://b.example"}).status_code == 200
        assert post(u, {"origin": "https://c.example"}).status_code == 403
