"""The OpenAI API: /v1/models, /v1/chat/completions, /v1/completions (SSE when streaming).

Request fields: max_tokens / max_completion_tokens, temperature, top_p, stop, seed,
logprobs / top_logprobs, stream, stream_options.include_usage, user; SamplingParams'
other fields (top_k, min_p, repeat_penalty, ...) as top-level extras; and the namespaced
`genarm` object (params.apply_genarm). Fields this server cannot honour (n > 1, tools,
logit_bias, penalties other than repeat_penalty, JSON modes, images) are a 400 naming
them, never silently ignored.
"""

from __future__ import annotations

import secrets
import time

from fastapi import Request

from . import params as P
from .common import JobResponse, State, dumps, read_body
from .render import explain_item, genarm_summary, logprob_entry, usage
from .worker import Job

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def register(app, state: State) -> None:
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(state, p) for p in state.models.presets]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        return model_card(state, state.models.resolve(model_id))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = P.parse_json(await read_body(request, state.max_body))
        preset = state.models.resolve(body.get("model"))
        spec = common_spec(body, state, preset, messages(body.get("messages")))
        spec.top_logprobs = P.logprobs_from(P.get_bool(body, "logprobs"), body.get("top_logprobs"))
        return respond(state, spec, preset.id, "chat", request.url.path)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = P.parse_json(await read_body(request, state.max_body))
        preset = state.models.resolve(body.get("model"))
        spec = common_spec(body, state, preset, completion_prompt(body, state.engine))
        spec.raw = True
        lp = P.get_int(body, "logprobs", 0)
        if lp is not None and lp > P.MAX_TOP_LOGPROBS:
            raise P.bad(f"'logprobs' must be from 0 to {P.MAX_TOP_LOGPROBS}", "logprobs")
        spec.top_logprobs = lp
        P.refuse_unless(not P.get_bool(body, "echo"), "'echo' is not supported", "echo")
        P.refuse_unless(body.get("best_of") in (None, 1), "'best_of' > 1 is not supported", "best_of")
        P.refuse_unless(not body.get("suffix"), "'suffix' (fill in the middle) is not supported", "suffix")
        return respond(state, spec, preset.id, "text", request.url.path)


def model_card(state: State, p) -> dict:
    return {"id": p.id, "object": "model", "created": int(state.started), "owned_by": "edge-genarm",
            "genarm": {"weights": {**state.engine.weights, **p.weights}, "guidance": p.guidance,
                       "about": p.about}}  # fmt: skip


# ---------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------


def messages(v) -> list[dict]:
    """Chat messages as the template wants them: text only, roles system/user/assistant."""
    if not isinstance(v, list) or not v:
        raise P.bad("'messages' must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise P.bad(f"'{where}' must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise P.bad(f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}"
                        + (" (tools are not supported)" if role in ("tool", "function") else ""), f"{where}.role")  # fmt: skip
        P.refuse_unless(not m.get("tool_calls"), "tool calls are not supported", f"{where}.tool_calls")
        out.append({"role": ROLES[role], "content": content_text(m.get("content"), f"{where}.content")})
    return out


def content_text(c, where: str) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for j, part in enumerate(c):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise P.bad(f"'{where}[{j}]' must be {{\"type\": \"text\", \"text\": ...}}: this model reads "
                            f"text only (got type {kind!r})", f"{where}[{j}]")  # fmt: skip
            parts.append(part["text"])
        return "\n".join(parts)
    raise P.bad(f"'{where}' must be a string or an array of text parts", where)


def completion_prompt(body: dict, engine):
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # one prompt in an array
    if isinstance(p, str):
        if not p:
            raise P.bad("'prompt' is empty: give some text", "prompt")
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        n = engine.base.n_vocab
        bad = next((t for t in p if not 0 <= t < n), None)
        if bad is not None:
            raise P.bad(f"'prompt' token id {bad} is outside the vocabulary (0..{n - 1})", "prompt")
        return list(p)
    raise P.bad("'prompt' must be a string, an array of one string, or an array of token ids "
                "(one prompt per request)", "prompt")  # fmt: skip


def common_spec(body: dict, state: State, preset, prompt) -> P.Spec:
    """The fields /v1/chat/completions and /v1/completions share."""
    P.refuse_unless(body.get("n") in (None, 1), "'n' > 1 is not supported: send n requests (with "
                    "different seeds)", "n")  # fmt: skip
    for k in ("frequency_penalty", "presence_penalty"):
        P.refuse_unless(P.get_number(body, k) in (None, 0), f"'{k}' is not supported: use 'repeat_penalty' "
                        "(llama.cpp's) or DRY ('dry_multiplier')", k)  # fmt: skip
    P.refuse_unless(not body.get("logit_bias"), "'logit_bias' is not supported", "logit_bias")
    P.refuse_unless(not body.get("tools") and not body.get("functions"), "tools are not supported", "tools")
    rf = body.get("response_format")
    P.refuse_unless(rf is None or rf == {"type": "text"}, "only 'response_format' {\"type\": \"text\"} "
                    "is supported", "response_format")  # fmt: skip
    mt = P.get_int(body, "max_completion_tokens", 0)
    mt = P.get_int(body, "max_tokens", 0) if mt is None else mt
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise P.bad("'stream_options' must be an object", "stream_options")
    spec = P.Spec(
        model=preset.id, prompt=prompt, max_tokens=mt, seed=P.seed_from(body.get("seed")),
        stop=P.get_stop(body), sampling=P.sampling_from(body), weights=dict(preset.weights),
        guidance=preset.guidance, stream=P.get_bool(body, "stream"),
        include_usage=P.get_bool(so or {}, "include_usage", param="stream_options.include_usage"),
        user=P.get_str(body, "user"),
    )  # fmt: skip
    P.apply_genarm(spec, body, state.engine)
    return spec


def respond(state: State, spec: P.Spec, model_id: str, kind: str, path: str):
    job = P.start(state.engine, spec, Job, f"{kind} {model_id}")
    render = (stream_chunks if spec.stream else whole)(state, spec, kind)
    return JobResponse(state.scheduler, job, render, "text/event-stream" if spec.stream else "application/json",
                       path)  # fmt: skip


# ---------------------------------------------------------------------------
# answers
# ---------------------------------------------------------------------------


def whole(state: State, spec: P.Spec, kind: str):
    async def render(job: Job, pieces):
        engine, text, lps, explain, t0 = state.engine, [], [], [], time.time()
        async for piece in pieces:
            text.append(piece.rec.text)
            if piece.rec.token >= 0:
                if spec.top_logprobs is not None:
                    lps.append(logprob_entry(engine, piece))
                if spec.explain:
                    explain.append(explain_item(engine, piece))
        choice = {"index": 0, "finish_reason": job.gen.finish_reason or "stop"}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": "".join(text)}
            choice["logprobs"] = None if spec.top_logprobs is None else {"content": lps}
        else:
            choice["text"] = "".join(text)
            choice["logprobs"] = None if spec.top_logprobs is None else legacy_logprobs(lps)
        g = genarm_summary(job, spec, spec.model, done=True)
        if spec.explain:
            g["explain"] = explain
        yield dumps({"id": _id(kind), "object": "chat.completion" if kind == "chat" else "text_completion",
                     "created": int(t0), "model": spec.model, "choices": [choice], "usage": usage(job),
                     "genarm": g})  # fmt: skip

    return render


def stream_chunks(state: State, spec: P.Spec, kind: str):
    async def render(job: Job, pieces):
        engine, cid, created = state.engine, _id(kind), int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta=None, finish=None, lps=None, genarm=None, choices=True):
            c = {"index": 0, "finish_reason": finish}
            if kind == "chat":
                c["delta"], c["logprobs"] = delta or {}, None if lps is None else {"content": lps}
            else:
                c["text"], c["logprobs"] = (
                    (delta or {}).get("content", ""),
                    None if lps is None else legacy_logprobs(lps),
                )
            out = {"id": cid, "object": obj, "created": created, "model": spec.model,
                   "choices": [c] if choices else []}  # fmt: skip
            if spec.include_usage:
                out["usage"] = None
            if genarm is not None:
                out["genarm"] = genarm
            return b"data: " + dumps(out) + b"\n\n"

        try:
            first = True
            async for piece in pieces:
                if first:  # the engine has started: say who answers, with which weights
                    first = False
                    yield chunk(
                        {"role": "assistant", "content": ""},
                        genarm=genarm_summary(job, spec, spec.model, False),
                    )
                r = piece.rec
                lps = (
                    [logprob_entry(engine, piece)] if spec.top_logprobs is not None and r.token >= 0 else None
                )
                ex = {"explain": [explain_item(engine, piece)]} if spec.explain and r.token >= 0 else None
                if r.text or lps or ex:
                    yield chunk({"content": r.text}, lps=lps, genarm=ex)
            if first:  # nothing generated (max_tokens 0, or an end token first): still say who answers
                yield chunk(
                    {"role": "assistant", "content": ""}, genarm=genarm_summary(job, spec, spec.model, False)
                )
            yield chunk(
                finish=job.gen.finish_reason or "stop", genarm=genarm_summary(job, spec, spec.model, True)
            )
            if spec.include_usage:
                yield b"data: " + dumps({"id": cid, "object": obj, "created": created, "model": spec.model,
                                         "choices": [], "usage": usage(job)}) + b"\n\n"  # fmt: skip
            yield b"data: [DONE]\n\n"
        except (P.ApiError, Exception) as e:
            if first:
                raise  # nothing sent yet: JobResponse answers with an error status
            err = e if isinstance(e, P.ApiError) else P.ApiError(500, f"generation failed: {e}")
            yield b"data: " + dumps(err.openai()) + b"\n\n"

    return render


def legacy_logprobs(entries: list[dict]) -> dict:
    """/v1/completions' older log-prob layout."""
    offsets, pos = [], 0
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}  # fmt: skip


def _id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
