"""What every scheduler shares: a bounded admission queue, abort and close, and a loop thread that warms up first."""

from __future__ import annotations

import abc
import logging
import threading
from collections import deque

import torch

from inference_core.errors import EngineClosedError, EngineError, InvalidRequestError, QueueFullError
from inference_core.sequence import Sequence
from inference_core.types import FinishReason

log = logging.getLogger(__name__)


class AdmissionQueue(abc.ABC):
    """Admits sequences into a queue of at most ``max_queue`` waiting entries, served by one loop thread.

    ``submit`` raises QueueFullError at once when the queue is full and EngineClosedError after ``close``.
    ``abort`` removes a waiting sequence or asks a running one to stop before its next step; either way the sequence
    ends with finish_reason CANCELLED. Subclasses implement ``_warm_up`` and ``_serve`` (the loop after warm-up).
    """

    def __init__(self, max_queue: int, thread_name: str) -> None:
        self._max_queue = max_queue
        self._waiting: deque[Sequence] = deque()
        self._known: dict[str, Sequence] = {}
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)
        self._warmed = threading.Event()
        self._warm_up_error: Exception | None = None

    def start(self) -> None:
        """Starts the loop thread and blocks until it has warmed the model up; raises EngineError if that fails."""
        self._thread.start()
        self._warmed.wait()
        if self._warm_up_error is not None:
            raise EngineError(f"the model failed its warm-up step: {self._warm_up_error}") from self._warm_up_error

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        """Sequences submitted and not yet finished (waiting or running)."""
        return len(self._known)

    def submit(self, seq: Sequence) -> None:
        with self._cv:
            if self._closed:
                raise EngineClosedError("the engine is shutting down; retry on another replica")
            existing = self._known.get(seq.request_id)
            # A finished sequence may still be listed for a moment after its last chunk went out.
            if existing is not None and not existing.finished:
                raise InvalidRequestError(f"request id {seq.request_id!r} is already in flight; use a unique id")
            if len(self._waiting) >= self._max_queue:
                raise QueueFullError(
                    f"the engine queue is full ({len(self._waiting)} requests waiting); retry later or add replicas"
                )
            self._waiting.append(seq)
            self._known[seq.request_id] = seq
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        with self._cv:
            seq = self._known.get(request_id)
            if seq is None:
                return
            if seq in self._waiting:
                self._waiting.remove(seq)
                del self._known[request_id]
                seq.finish(FinishReason.CANCELLED)
            else:
                seq.abort_requested = True

    def close(self, timeout: float | None = None) -> None:
        """Cancels every waiting and running sequence and joins the loop thread."""
        with self._cv:
            self._closed = True
            while self._waiting:
                seq = self._waiting.popleft()
                self._known.pop(seq.request_id, None)
                seq.finish(FinishReason.CANCELLED)
            for seq in self._known.values():
                seq.abort_requested = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _forget(self, seq: Sequence) -> None:
        if self._known.get(seq.request_id) is seq:
            del self._known[seq.request_id]

    def _loop(self) -> None:
        # Warm up on this thread: torch's intra-op thread pool belongs to the thread that runs the model.
        try:
            with torch.inference_mode():
                self._warm_up()
        except Exception as e:
            log.exception("warm-up failed")
            self._warm_up_error = e
            return
        finally:
            self._warmed.set()
        self._serve()

    @abc.abstractmethod
    def _warm_up(self) -> None:
        """One tiny forward pass, so one-time costs are paid before serving."""

    @abc.abstractmethod
    def _serve(self) -> None:
        """The loop proper; returns once closed and nothing is left running."""
