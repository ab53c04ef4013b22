"""Ollama's API: /api/version, /api/tags, /api/show, /api/chat, /api/generate (NDJSON streams).

`options` map onto the same engine arguments as the OpenAI fields: num_predict, temperature,
top_k, top_p, min_p, seed, stop, repeat_penalty, repeat_last_n (and the other SamplingParams
fields). Options that configure loading (num_ctx, num_thread, ...) are fixed when the server
starts and are ignored; sampling options this engine does not have are a 400. The `genarm`
object is read at the top level or inside `options` (the ollama client passes `options` through
as given). Errors use Ollama's own `{"error": "..."}`, which its clients read as a string.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from fastapi import Request

from .. import __version__
from . import params as P
from .common import JobResponse, State, dumps, read_body
from .openai_api import content_text
from .render import explain_item, genarm_summary, logprob_entry
from .worker import Job

OLLAMA_VERSION = "0.6.0"  # the API level these endpoints follow
LOAD_OPTIONS = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only",
                "use_mmap", "use_mlock", "embedding_only", "num_thread", "numa", "num_keep", "penalize_newline"}  # fmt: skip
SAMPLING_OPTIONS = {"num_predict", "seed", "stop", "genarm", *P.SAMPLING_FIELDS}


def register(app, state: State) -> None:
    @app.get("/api/version")
    async def version():
        return {"version": OLLAMA_VERSION, "edge_genarm": __version__}

    @app.get("/api/tags")
    async def tags():
        return {"models": [tag(state, p.id) for p in state.models.presets]}

    @app.post("/api/show")
    async def show(request: Request):
        body = P.parse_json(await read_body(request, state.max_body))
        p = state.models.resolve(body.get("model") or body.get("name"))
        e = state.engine
        arch = e.base.info.get("general.architecture") or "llama"
        return {"license": "", "modelfile": "", "parameters": "", "template": e.chat_template or "",
                "details": details(e), "capabilities": ["completion"], "modified_at": _iso(state.started),
                "model_info": {"general.architecture": arch, f"{arch}.context_length": e.base.n_ctx_train,
                               "general.parameter_count": None},
                "genarm": {"weights": {**e.weights, **p.weights}, "guidance": p.guidance}}  # fmt: skip

    @app.post("/api/chat")
    async def chat(request: Request):
        body = P.parse_json(await read_body(request, state.max_body))
        preset = state.models.resolve(body.get("model"))
        P.refuse_unless(not body.get("tools"), "tools are not supported", "tools")
        msgs = chat_messages(body.get("messages"))
        if not msgs:  # Ollama answers an empty chat by loading the model
            return loaded(state, preset.id, "chat")
        spec = ollama_spec(body, state, preset, msgs)
        return respond(state, spec, "chat", request.url.path)

    @app.post("/api/generate")
    async def generate(request: Request):
        body = P.parse_json(await read_body(request, state.max_body))
        preset = state.models.resolve(body.get("model"))
        prompt = P.get_str(body, "prompt")
        for k, why in (
            ("template", "templates come from the model"),
            ("suffix", "fill in the middle"),
            ("context", "send the conversation to /api/chat"),
            ("images", "this model reads text"),
        ):
            P.refuse_unless(not body.get(k), f"'{k}' is not supported ({why})", k)  # fmt: skip
        if not prompt:
            return loaded(state, preset.id, "generate")
        spec = ollama_spec(body, state, preset, prompt)
        spec.raw = P.get_bool(body, "raw")
        spec.system = P.get_str(body, "system")
        return respond(state, spec, "generate", request.url.path)


def details(engine) -> dict:
    info = engine.base.info
    return {"format": "gguf", "family": info.get("general.architecture") or "", "families": None,
            "parameter_size": info.get("general.size_label") or "",
            "quantization_level": str(info.get("general.file_type") or "")}  # fmt: skip


def tag(state: State, name: str) -> dict:
    return {"name": name, "model": name, "modified_at": _iso(state.started),
            "size": state.engine.base.path.stat().st_size, "digest": state.digest(),
            "details": details(state.engine)}  # fmt: skip


def chat_messages(v) -> list[dict]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise P.bad("'messages' must be an array of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or m["role"] not in ("system", "user", "assistant")
        ):
            raise P.bad(f"'{where}' must be an object with 'role' system, user or assistant", f"{where}.role")
        P.refuse_unless(
            not m.get("images"), "images are not supported: this model reads text", f"{where}.images"
        )
        P.refuse_unless(not m.get("tool_calls"), "tool calls are not supported", f"{where}.tool_calls")
        out.append({"role": m["role"], "content": content_text(m.get("content", ""), f"{where}.content")})
    return out


def ollama_spec(body: dict, state: State, preset, prompt) -> P.Spec:
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise P.bad("'options' must be an object", "options")
    for k, v in opts.items():
        if k not in SAMPLING_OPTIONS and k not in LOAD_OPTIONS:
            known = ", ".join(sorted(SAMPLING_OPTIONS - {"genarm"}))
            raise P.bad(f"option '{k}' is not supported by this engine: use {known}", f"options.{k}")
        if k in ("mirostat",) and v:
            raise P.bad("mirostat is not supported", "options.mirostat")
    fmt = body.get("format")
    P.refuse_unless(fmt in (None, ""), "'format' (JSON output) is not supported", "format")
    P.refuse_unless(not body.get("think"), "this model does not think: leave 'think' off", "think")
    n = P.get_int(opts, "num_predict", param="options.num_predict")
    spec = P.Spec(
        model=preset.id, prompt=prompt, max_tokens=None if n is None or n < 0 else n,
        seed=P.seed_from(opts.get("seed"), "options.seed"), stop=P.get_stop(opts),
        sampling=P.sampling_from(opts, "options."), weights=dict(preset.weights), guidance=preset.guidance,
        stream=P.get_bool(body, "stream", default=True),
    )  # fmt: skip
    spec.top_logprobs = P.logprobs_from(P.get_bool(body, "logprobs"), body.get("top_logprobs"))
    if "genarm" in opts and "genarm" in body:
        raise P.bad("give 'genarm' once: at the top level or in 'options'", "genarm")
    P.apply_genarm(spec, body if "genarm" in body else opts, state.engine)
    return spec


def respond(state: State, spec: P.Spec, kind: str, path: str):
    job = P.start(state.engine, spec, Job, f"ollama-{kind} {spec.model}")
    media = "application/x-ndjson" if spec.stream else "application/json"
    return JobResponse(state.scheduler, job, lines(state, spec, kind), media, path)


def loaded(state: State, model: str, kind: str) -> dict:
    out = {"model": model, "created_at": _iso(time.time()), "done": True, "done_reason": "load"}
    out.update({"message": {"role": "assistant", "content": ""}} if kind == "chat" else {"response": ""})
    return out


def lines(state: State, spec: P.Spec, kind: str):
    """NDJSON when streaming (one object per token, then the `done` one), else one object."""

    async def render(job: Job, pieces):
        engine, t0, text, lps, explain = state.engine, time.perf_counter(), [], [], []

        def part(s: str, done: bool, lp=None, ex=None) -> dict:
            out = {"model": spec.model, "created_at": _iso(time.time()), "done": done}
            out.update(
                {"message": {"role": "assistant", "content": s}} if kind == "chat" else {"response": s}
            )
            if lp:
                out["logprobs"] = lp
            if ex:
                out["genarm"] = {"explain": ex}
            return out

        sent = False
        try:
            async for piece in pieces:
                r = piece.rec
                lp = [logprob_entry(engine, piece)] if spec.top_logprobs is not None and r.token >= 0 else []
                ex = [explain_item(engine, piece)] if spec.explain and r.token >= 0 else []
                if spec.stream:
                    if r.text or lp or ex:
                        sent = True
                        yield dumps(part(r.text, False, lp, ex)) + b"\n"
                else:
                    text.append(r.text)
                    lps.extend(lp)
                    explain.extend(ex)
        except Exception as e:
            if not sent:  # nothing sent yet: JobResponse answers with an error status
                raise
            yield dumps({"error": f"generation failed: {e}"}) + b"\n"
            return
        t = job.gen.timings
        final = part("".join(text), True, lps, None)
        final.update({"done_reason": job.gen.finish_reason or "stop",
                      "total_duration": int(1e9 * (time.perf_counter() - t0)), "load_duration": 0,
                      "prompt_eval_count": t.prompt_tokens, "prompt_eval_duration": int(1e9 * t.prompt_s),
                      "eval_count": job.steps, "eval_duration": int(1e9 * t.total_s),
                      "genarm": {**genarm_summary(job, spec, spec.model, True),
                                 **({"explain": explain} if explain else {})}})  # fmt: skip
        yield dumps(final) + b"\n"

    return render


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")
