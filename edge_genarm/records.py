"""Record files: prompts in (JSONL, one reader for every command), results out.

Outputs are JSONL files appended one whole line per os.write (O_APPEND) and fsynced,
so a killed run leaves at most a torn last line, which the next run cuts off before it
resumes after the last whole line.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import EdgeGenarmError


class DataError(EdgeGenarmError):
    """A data file (prompts, pairs, records) has a line that cannot be used."""


def report_bad_line(msg: str, on_error: str, stats: dict) -> None:
    """Raise under --on-error stop; otherwise warn and count."""
    if on_error == "stop":
        raise DataError(msg + " (or pass --on-error skip)")
    print(f"warning: {msg}: skipped", file=sys.stderr)
    stats["bad_lines"] = stats.get("bad_lines", 0) + 1


def read_prompts(
    path: str | Path, on_error: str = "stop", stats: dict | None = None
) -> list[tuple[int, str]]:
    """[(line index, prompt)] from a JSONL file of {"prompt": "..."} lines (index from 0).

    A missing file, one that is not UTF-8, or one with no prompt at all is a DataError naming
    the file; a bad line names its line number (raised, or counted under on_error="skip").
    """
    stats = {} if stats is None else stats
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file '{path}' does not exist: give a JSONL file of {{\"prompt\": ...}} lines")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise DataError(f"prompt file '{path}' cannot be read as UTF-8 text ({e}): save it as UTF-8 JSONL") from None
    out = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            report_bad_line(f"{path} line {i + 1} is not valid JSON ({why})", on_error, stats)
            continue
        p = rec.get("prompt") if isinstance(rec, dict) else None
        if not isinstance(p, str) or not p.strip():
            report_bad_line(f'{path} line {i + 1} has no non-empty "prompt" string', on_error, stats)
            continue
        out.append((i, p))
    if not out:
        raise DataError(f'prompt file \'{path}\' has no prompts: each line needs {{"prompt": "..."}}')
    return out


def whole_records(out: Path) -> list[dict]:
    """Every whole JSON line already in `out` (oldest first); a torn last line is cut off."""
    out = Path(out)
    if not out.is_file():
        return []
    data = out.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):  # killed mid-write: drop the partial line before appending
        with open(out, "r+b") as f:
            f.truncate(len(whole))
    recs = []
    for line in whole.decode("utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            recs.append(rec)
    return recs


def done_keys(out: Path, key: Callable[[dict], object]) -> set:
    """key(record) of every whole record in `out` (records key() rejects are ignored)."""
    done = set()
    for rec in whole_records(out):
        try:
            done.add(key(rec))
        except (KeyError, TypeError, ValueError):
            continue
    return done


def done_prompts(out: Path) -> set[int]:
    """prompt_index of every whole line already in `out`; a torn last line is cut off."""
    return done_keys(out, lambda r: int(r["prompt_index"]))


def append_line(out: Path, rec: dict) -> None:
    """One os.write of a whole line with O_APPEND, then fsync: a line is all there or absent."""
    data = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
