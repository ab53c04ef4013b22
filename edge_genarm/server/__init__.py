"""`edge-genarm serve`: an OpenAI- and Ollama-compatible local server with per-request
objective weights, and a chat page at `/`.

Choices, written down:
- One engine, one generation at a time, in one worker thread (worker.py): the engine and its
  KV caches are not thread-safe. Requests wait in a FIFO bounded by `--max-queue`; past it
  the answer is 503 with Retry-After (an estimate from recent job times). A client that
  disconnects stops its generation within one token (a flag checked between tokens); a
  request cancelled while waiting leaves the line and never runs.
- Per-request state lives in the engine's `Generation` (weights, RNG, timings): a request's
  weights never reach the next request or the server's defaults.
- Reproducible seeds: a request with a `seed` starts from KV-cache entries that a cold prefill
  would compute bit for bit (Engine._trim_for): llama.cpp's and onnxruntime's one-token kernels
  round differently from their batched ones (~0.5 nat on the Q4/int8 models), so positions
  decoded one at a time are evaluated again in a batch. The same request and seed give the same
  text alone or among other requests; a chat still reuses every earlier turn, but its last
  reply is evaluated again (in one batch: on a loaded 2-core machine ~4 s for a 128-token reply
  with the default pack, vs ~0.6 s). A request without a seed reuses everything cached.
- `logprobs`/`top_logprobs` are those of the distribution the sampler drew from: combined
  scores, penalties, temperature, then top-k/top-p/min-p (exactly `guidance.candidates`); a
  token outside it (greedy: everything but the argmax) would be -inf, sent as -9999 as OpenAI does.
- Guidance per request: the `genarm` object (`extra_body` in the openai client) with weights,
  guidance, nudge and explain; and presets as model ids (`<model>`, `<model>+<arm>`,
  `<model>+base`) for front-ends that can only choose a model. Every response echoes the
  weights it used (`genarm.weights`).
- Errors: every bad request is a 4xx with the OpenAI error object naming the field and the fix
  (Ollama's `{"error": "..."}` on /api/, which its clients read); unsupported OpenAI fields
  (n > 1, tools, logit_bias, ...) are refused, never silently ignored. A failing generation is
  a 500 (or an error event mid-stream) and the server goes on.
- Only loopback by default; `--api-key` requires a bearer key on /v1 and /api (the page at `/`
  asks for it). No CDN: the page is plain HTML/JS/CSS shipped in the package.
- A web page cannot drive it (gate.py): on loopback, a Host that is not a loopback name is 403
  (DNS rebinding); an Origin other than the server's own (or one given with `--allow-origin` /
  $EDGE_GENARM_ORIGINS) is 403; a POST to /v1 or /api that is not `application/json` is 415.
- Every body is checked before it is queued (params.py): nesting depth, valid Unicode, numbers
  in range (ARM weights within +-guidance.MAX_WEIGHT, sampling within what float32 can carry).
- Memory comes back: after each job the worker returns freed heap pages (memory.py, glibc's
  malloc_trim); `scripts/soak.py` measures RSS over a long mixed run.
"""
