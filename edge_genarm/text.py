"""Token bytes -> text for streaming: incremental UTF-8, stop strings held back.

A token may end inside a multi-byte character, and a stop string may arrive
split across tokens. So bytes go through an incremental decoder, and any tail
of the text that could still become a stop string is held back until it either
matches (the reply ends before it) or cannot (the tail is released).
"""

from __future__ import annotations

import codecs

from .errors import ConfigError


class TextStream:
    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        if isinstance(stops, str) or any(not isinstance(s, str) or not s for s in stops):
            raise ConfigError(
                f"stop must be a list of non-empty strings, got {stops!r}: e.g. --stop '\\n\\n'"
            )
        self.stops = list(stops)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Feed one token's bytes; return the text that is now safe to show."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        cut = min((i for i in (self._pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        hold = self._held_tail()
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out) :]
        return out

    def _held_tail(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """End of generation: release whatever is held (it never became a stop)."""
        if self.stopped:
            return ""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out
