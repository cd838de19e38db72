"""Stop-string matching on streamed text: cut before the first occurrence, never stream any part of a stop string."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Filters one sequence's text deltas.

    ``feed(delta)`` returns ``(text_to_emit, stopped)``. Text that could be the beginning of a stop string is held back
    until the following text rules it in (then the stream stops before it) or out (then it is emitted). ``flush()``
    returns what is held back when the sequence ends for another reason.

    Why searching only the held-back buffer is enough: everything emitted so far has no suffix that begins a stop
    string (the longest such suffix is always held back), so no occurrence can start inside emitted text.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stops = [s for s in stop if s]
        self._buffer = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self._stops:
            return delta, False
        self._buffer += delta
        first = min((i for i in (self._buffer.find(s) for s in self._stops) if i >= 0), default=-1)
        if first >= 0:
            self.stopped = True
            emit, self._buffer = self._buffer[:first], ""
            return emit, True
        hold = self._held_back_length()
        emit = self._buffer[: len(self._buffer) - hold]
        self._buffer = self._buffer[len(self._buffer) - hold :]
        return emit, False

    def flush(self) -> str:
        emit, self._buffer = self._buffer, ""
        return "" if self.stopped else emit

    def _held_back_length(self) -> int:
        """Length of the longest suffix of the buffer that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._buffer)), longest, -1):
                if stop.startswith(self._buffer[-length:]):
                    longest = length
                    break
        return longest
