"""The chat REPL: streaming replies, a few slash commands, Ctrl+C stops the reply."""

from __future__ import annotations

import sys
from dataclasses import replace

from .errors import EdgeGenarmError
from .nudge import NudgeConfig

HELP = """commands:
  /set arm NAME WEIGHT   change an ARM's weight (0 turns it off)
  /set temperature X     also top_k, top_p, min_p, repeat_penalty, repeat_last_n, dry_multiplier,
                         max_tokens, seed
  /set nudge on|off      entropy-triggered nudging
  /arms                  loaded ARMs and their weights
  /system TEXT           set the system prompt (starts a new conversation)
  /reset                 forget the conversation
  /stats                 speed of the last reply
  /help                  this text
  /bye                   leave (Ctrl+D too)
  \"\"\"                    begin / end multi-line input"""


def _read(prompt: str) -> str | None:
    try:
        line = input(prompt)
    except EOFError:
        return None
    if line.strip() != '"""':
        return line
    lines = []
    while True:
        try:
            more = input("... ")
        except EOFError:
            break
        if more.strip() == '"""':
            break
        lines.append(more)
    return "\n".join(lines)


# /set NAME VALUE: where the setting lives, its type, an example value
_SETTINGS = {
    "temperature": ("sampling", float, "0.7"),
    "top_p": ("sampling", float, "0.9"),
    "min_p": ("sampling", float, "0.05"),
    "repeat_penalty": ("sampling", float, "1.1"),
    "dry_multiplier": ("sampling", float, "0.8"),
    "top_k": ("sampling", int, "40"),
    "repeat_last_n": ("sampling", int, "64"),
    "max_tokens": ("request", int, "256"),
    "seed": ("request", int, "42"),
}


def _number(value: str, typ: type, why: str):
    """`value` as a finite `typ`, else a ValueError saying `why` (what to type instead)."""
    try:
        v = typ(value)
    except ValueError:
        raise ValueError(why) from None
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(why)
    return v


def _set_option(kw: dict, name: str, value: str) -> str:
    """Change one generation setting in `kw`; raises ValueError (or ConfigError) with the reason in words."""
    name = name.replace("-", "_")
    if name == "nudge":
        if value not in ("on", "off"):
            raise ValueError("nudge is on or off, e.g. /set nudge on")
        kw["nudge"] = (kw.get("nudge") or NudgeConfig()) if value == "on" else None
        return f"nudge = {value}"
    if name not in _SETTINGS:
        raise ValueError(f"unknown setting '{name}': {', '.join(_SETTINGS)}, nudge (or /set arm NAME WEIGHT)")
    where, typ, example = _SETTINGS[name]
    kind = "a whole number" if typ is int else "a number"
    v = _number(value, typ, f"{name} must be {kind}, e.g. /set {name} {example}")
    if where == "sampling":
        kw["sampling"] = replace(kw["sampling"], **{name: v})  # SamplingParams checks the range
    elif v < 0:
        raise ValueError(f"{name} must be 0 or more, e.g. /set {name} {example}")
    else:
        kw[name] = v
    return f"{name} = {v:g}"


def _command(line: str, engine, state: dict, out) -> bool:
    """Handle a /command; False means leave."""
    parts = line.split(maxsplit=3)
    cmd = parts[0]
    if cmd in ("/bye", "/exit", "/quit"):
        return False
    if cmd == "/help":
        out(HELP)
    elif cmd == "/arms":
        out("\n".join(f"  {n} = {w:g}" for n, w in engine.weights.items()) or "  no ARMs loaded")
    elif cmd == "/reset":
        state["messages"] = []
        out("conversation cleared")
    elif cmd == "/system":
        state["system"] = line[len("/system") :].strip() or None
        state["messages"] = []
        out("system prompt set; conversation cleared")
    elif cmd == "/stats":
        if state.get("timings") is None:
            out("  no reply yet")
            return True
        s = state["timings"].summary()
        out(
            f"  {s['tokens']} tokens, {s['tok_per_s']:.1f} tok/s, base {s['base_ms']:.2f} ms, "
            "ARMs "
            + (", ".join(f"{k} {v:.2f} ms" for k, v in s["arm_ms"].items()) or "none")
            + f", python {s['python_ms']:.3f} ms per token"
        )
    elif cmd == "/set" and len(parts) == 4 and parts[1] == "arm":
        try:
            w = _number(parts[3], float, f"an ARM weight must be a number, e.g. /set arm {parts[2]} 0.5")
            engine.set_weights({parts[2]: w})
            out(f"  {parts[2]} = {w:g}")
        except (ValueError, EdgeGenarmError) as e:
            out(f"  error: {e}")
    elif cmd == "/set" and len(parts) == 3:
        try:
            out("  " + _set_option(state["kw"], parts[1], parts[2]))
        except (ValueError, EdgeGenarmError) as e:
            out(f"  error: {e}")
    elif cmd == "/set":
        out("  error: use /set NAME VALUE (e.g. /set temperature 0.7) or /set arm NAME WEIGHT")
    else:
        out(f"unknown command {line!r}: /help lists the commands")
    return True


class _Pending:
    """An engine still loading in another thread: the first use waits for it (and says so)."""

    def __init__(self, future, out):
        self.future, self.out, self.engine = future, out, None

    def __getattr__(self, name):
        if self.engine is None:
            if not self.future.done():
                self.out("(loading the models...)")
            try:
                self.engine = self.future.result()
            except EdgeGenarmError as e:  # nothing to chat with: end the session, as a failed load would
                self.out(f"Error: {e}")
                raise SystemExit(1) from None
        return getattr(self.engine, name)


def run_repl(engine, gen_kwargs: dict, stdout=sys.stdout) -> None:
    """The chat loop. `engine` may be a Future of one (see cli.chat): it is waited for on first use."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass

    def out(s):
        print(s, file=stdout, flush=True)

    if hasattr(engine, "result") and hasattr(engine, "done"):
        engine = _Pending(engine, out)
    state = {"messages": [], "system": gen_kwargs.pop("system", None), "kw": gen_kwargs}
    out("edge-genarm chat: /help for commands, /bye to leave")
    while True:
        line = _read(">>> ")
        if line is None:
            break
        if not line.strip():
            continue
        if line.startswith("/"):
            if not _command(line.strip(), engine, state, out):
                break
            continue
        state["messages"].append({"role": "user", "content": line})
        reply, gen = [], None
        try:
            gen = engine.stream(state["messages"], system=state["system"], **gen_kwargs)
            for rec in gen:
                reply.append(rec.text)
                print(rec.text, end="", file=stdout, flush=True)
        except KeyboardInterrupt:
            out("\n[stopped]")
        except EdgeGenarmError as e:
            out(f"\nerror: {e}")
            state["messages"].pop()
            continue
        if gen is not None:
            state["timings"] = gen.timings
            s = gen.timings.summary()
            out(f"\n[{s['tokens']} tokens, {s['tok_per_s']:.1f} tok/s]")
        state["messages"].append({"role": "assistant", "content": "".join(reply)})
