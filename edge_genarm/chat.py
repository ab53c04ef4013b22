"""Chat templates: the GGUF's own Jinja template, rendered in a sandbox."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from .errors import ConfigError

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}

# Used only when a model carries no template of its own and none is given.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def check_messages(messages) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise ConfigError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ConfigError(f"message {i} must be {{'role': str, 'content': str}}, got {m!r}")
    return messages


def render(
    template: str,
    messages: list[Message],
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    messages = check_messages(messages)
    try:
        return _render(template, messages, bos_token, eos_token, add_generation_prompt)
    except ConfigError:
        raise
    except Exception as e:  # a template is a program: any error in it is the template's
        raise ConfigError(
            f"cannot render the chat template: {_why(e)}; pass another with --chat-template"
        ) from None


def _environment(raise_exception=None):
    """A sandbox with what Hugging Face chat templates use (and llama-cpp-python offers): loop
    controls, the `{% generation %}` tag (passed through), raise_exception, strftime_now."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


def compile_error(template: str) -> str | None:
    """Why `template` does not compile (a syntax error), or None."""
    try:
        _environment().from_string(template)
    except Exception as e:
        return _why(e)
    return None


def _render(template: str, messages, bos_token="", eos_token="", add_generation_prompt=True) -> str:
    def raise_exception(msg):
        raise ConfigError(f"the chat template refused the messages: {msg}")

    return (
        _environment(raise_exception)
        .from_string(template)
        .render(
            messages=messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    )


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}".rstrip(": ")


_PROBE = "Hello from edge-genarm 42"


def check_template(template, origin: str) -> None:
    """Refuse, at load, a chat template that cannot render one user message with its text in it.

    `origin` names where it came from (a GGUF key, the manifest, a file): the error says so.
    None or "" means none (the prompt is then sent raw: Engine.format_prompt)."""
    if template is None or template == "":
        return
    fix = "fix it, or pass a working template with --chat-template FILE"
    if not isinstance(template, str):
        raise ConfigError(f"the chat template in {origin} is {type(template).__name__}, not text: {fix}")
    try:
        text = _render(template, [{"role": "user", "content": _PROBE}])
    except Exception as e:
        why = str(e) if isinstance(e, ConfigError) else _why(e)
        raise ConfigError(f"the chat template in {origin} does not work ({why}): {fix}") from None
    if _PROBE not in text:
        raise ConfigError(
            f"the chat template in {origin} leaves the user's message out of the prompt "
            f"(it rendered {text[:60]!r}): {fix}"
        )


def read_template(path) -> str:
    """A chat template file's text; unreadable or not UTF-8 is a ConfigError naming it."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"chat template file '{path}' cannot be read as UTF-8 text ({_why(e)}): fix it"
        ) from None
