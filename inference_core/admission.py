"""What every scheduler shares: a bounded admission queue (first come first served, or fair between tenants), abort
and close, and a loop thread that warms up first."""

from __future__ import annotations

import abc
import logging
import threading
from collections import deque
from collections.abc import Mapping

import torch

from inference_core.errors import EngineClosedError, EngineError, InvalidRequestError, QueueFullError
from inference_core.sequence import Sequence
from inference_core.types import FinishReason

log = logging.getLogger(__name__)


class WaitingQueue(abc.ABC):
    """The sequences waiting for the engine, and the policy that orders them and shares the running slots.

    Not thread-safe: AdmissionQueue calls it under its lock. ``held`` maps a tenant to the running slots its sequences
    hold (tenants holding none may be left out).
    """

    def __init__(self, max_queue: int) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_queue = max_queue

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def push(self, seq: Sequence) -> None:
        """Adds a new sequence at the back of its line; raises QueueFullError (nothing added) when it has no place."""

    @abc.abstractmethod
    def requeue(self, seq: Sequence) -> None:
        """Puts a preempted sequence back at the front of its tenant's line; never refused."""

    @abc.abstractmethod
    def next_tenant(self, held: Mapping[str, int] | None = None) -> str | None:
        """The tenant whose sequence should get the next free slot; None when nothing waits."""

    @abc.abstractmethod
    def pop(self, tenant: str) -> Sequence:
        """Takes the first waiting sequence of ``tenant`` (as named by ``next_tenant``)."""

    @abc.abstractmethod
    def remove(self, seq: Sequence) -> bool:
        """Takes ``seq`` out if it waits here; False if it does not."""

    @abc.abstractmethod
    def drain(self) -> list[Sequence]:
        """Takes every waiting sequence out, in no particular order."""

    @abc.abstractmethod
    def waiting_by_tenant(self) -> dict[str, int]:
        """Waiting sequences per tenant that has any."""

    def tenant_to_preempt(self, tenant: str, held: Mapping[str, int]) -> str | None:
        """The tenant that should give up a running slot so that ``tenant``'s waiting sequence starts now, or None to
        let it wait for a slot to free. The default never preempts."""
        return None

    def favours(self, tenant: str, held: Mapping[str, int]) -> bool:
        """Whether ``tenant``'s sequence, about to be admitted, should get its first token before the running rows get
        their next ones (the scheduler then leaves them out of one step). The default never favours."""
        return False

    def pop_next(self) -> Sequence | None:
        """The next sequence regardless of slots (a scheduler that runs one sequence at a time)."""
        tenant = self.next_tenant()
        return None if tenant is None else self.pop(tenant)

    def _refuse_if_full(self) -> None:
        if len(self) >= self.max_queue:
            raise QueueFullError(
                f"the engine queue is full ({len(self)} requests waiting); retry later or add replicas"
            )


class FifoQueue(WaitingQueue):
    """First come, first served, whatever the tenant: one heavy tenant can fill the queue and every slot."""

    def __init__(self, max_queue: int) -> None:
        super().__init__(max_queue)
        self._line: deque[Sequence] = deque()

    def __len__(self) -> int:
        return len(self._line)

    def push(self, seq: Sequence) -> None:
        self._refuse_if_full()
        self._line.append(seq)

    def requeue(self, seq: Sequence) -> None:
        self._line.appendleft(seq)

    def next_tenant(self, held: Mapping[str, int] | None = None) -> str | None:
        return self._line[0].tenant if self._line else None

    def pop(self, tenant: str) -> Sequence:
        return self._line.popleft()

    def remove(self, seq: Sequence) -> bool:
        if seq not in self._line:
            return False
        self._line.remove(seq)
        return True

    def drain(self) -> list[Sequence]:
        taken, self._line = list(self._line), deque()
        return taken

    def waiting_by_tenant(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for seq in self._line:
            counts[seq.tenant] = counts.get(seq.tenant, 0) + 1
        return counts


class FairQueue(WaitingQueue):
    """One first-come-first-served line per tenant, served by weighted round robin, with slots shared by weight.

    - Places: at most ``max_queue`` waiting in all and ``max_queue_per_tenant`` per tenant, so a tenant that floods is
      refused (QueueFullError) once its own line is full while other tenants still get in.
    - Order: tenants with waiting sequences take turns; a turn is ``weight`` sequences (weights default to 1). When
      slot holdings are given, the next free slot goes to the waiting tenant holding the fewest slots per weight, and
      turns only break ties, so freed slots drift towards an even share.
    - Slots: a waiting tenant takes a running slot from the tenant holding the most slots per weight when that tenant
      would still hold at least as many per weight afterwards (``tenant_to_preempt``). A newcomer so starts at once
      instead of waiting for a flood's long generations to end, and two tenants never take a slot back and forth.
    - First token: a sequence of a tenant holding fewer slots per weight than another is favoured (``favours``): the
      step that completes its prompt leaves the other rows' decode out.
    """

    def __init__(self, max_queue: int, max_queue_per_tenant: int, weights: Mapping[str, int] | None = None) -> None:
        super().__init__(max_queue)
        if max_queue_per_tenant < 1:
            raise ValueError(f"max_queue_per_tenant must be >= 1, got {max_queue_per_tenant}")
        bad = {tenant: weight for tenant, weight in (weights or {}).items() if weight < 1}
        if bad:
            raise ValueError(f"tenant weights must be >= 1, got {bad}")
        self.max_queue_per_tenant = max_queue_per_tenant
        self._weights = dict(weights or {})
        self._lines: dict[str, deque[Sequence]] = {}
        self._turns: deque[str] = deque()  # tenants with waiting sequences; the head's turn is under way
        self._served_in_turn = 0
        self._size = 0

    def weight(self, tenant: str) -> int:
        return self._weights.get(tenant, 1)

    def __len__(self) -> int:
        return self._size

    def push(self, seq: Sequence) -> None:
        self._refuse_if_full()
        line = self._lines.get(seq.tenant)
        if line is not None and len(line) >= self.max_queue_per_tenant:
            raise QueueFullError(
                f"tenant {seq.tenant!r} has {len(line)} requests waiting, its limit on this engine; retry later "
                f"or send fewer requests at once"
            )
        self._line_of(seq.tenant).append(seq)
        self._size += 1

    def requeue(self, seq: Sequence) -> None:
        self._line_of(seq.tenant).appendleft(seq)
        self._size += 1

    def next_tenant(self, held: Mapping[str, int] | None = None) -> str | None:
        if not self._turns:
            return None
        if not held:
            return self._turns[0]
        # min keeps the first of equals: the turn order breaks ties.
        return min(self._turns, key=lambda tenant: held.get(tenant, 0) / self.weight(tenant))

    def pop(self, tenant: str) -> Sequence:
        line = self._lines[tenant]
        seq = line.popleft()
        self._size -= 1
        if self._turns[0] != tenant:
            # Served out of turn (it held fewer slots): its turn starts now.
            self._turns.remove(tenant)
            self._turns.appendleft(tenant)
            self._served_in_turn = 0
        self._served_in_turn += 1
        if not line:
            self._leave(tenant)
        elif self._served_in_turn >= self.weight(tenant):
            self._turns.rotate(-1)
            self._served_in_turn = 0
        return seq

    def remove(self, seq: Sequence) -> bool:
        line = self._lines.get(seq.tenant)
        if line is None or seq not in line:
            return False
        line.remove(seq)
        self._size -= 1
        if not line:
            self._leave(seq.tenant)
        return True

    def drain(self) -> list[Sequence]:
        taken = [seq for line in self._lines.values() for seq in line]
        self._lines.clear()
        self._turns.clear()
        self._served_in_turn = 0
        self._size = 0
        return taken

    def waiting_by_tenant(self) -> dict[str, int]:
        return {tenant: len(line) for tenant, line in self._lines.items()}

    def tenant_to_preempt(self, tenant: str, held: Mapping[str, int]) -> str | None:
        others = [other for other, slots in held.items() if other != tenant and slots > 0]
        if not others:
            return None
        richest = max(others, key=lambda other: held[other] / self.weight(other))
        after = (held.get(tenant, 0) + 1) / self.weight(tenant)
        return richest if (held[richest] - 1) / self.weight(richest) >= after else None

    def favours(self, tenant: str, held: Mapping[str, int]) -> bool:
        """True while another tenant would still hold more slots per weight than ``tenant`` with this sequence: a
        newcomer's first token then costs the flood one decode step instead of waiting for a step of the whole
        batch."""
        after = (held.get(tenant, 0) + 1) / self.weight(tenant)
        return any(other != tenant and slots / self.weight(other) > after for other, slots in held.items())

    def _line_of(self, tenant: str) -> deque[Sequence]:
        line = self._lines.get(tenant)
        if line is None:
            line = self._lines[tenant] = deque()
            self._turns.append(tenant)
        return line

    def _leave(self, tenant: str) -> None:
        # Per-tenant state lives only while the tenant has waiting sequences, so any number of tenants costs nothing.
        del self._lines[tenant]
        if self._turns[0] == tenant:
            self._served_in_turn = 0
        self._turns.remove(tenant)


class AdmissionQueue(abc.ABC):
    """Admits sequences into ``waiting`` (a WaitingQueue: its policy bounds and orders it), served by one loop thread.

    ``submit`` raises QueueFullError at once when the queue has no place for the sequence and EngineClosedError after
    ``close``. ``abort`` removes a waiting sequence or asks a running one to stop before its next step; either way the
    sequence ends with finish_reason CANCELLED. Subclasses implement ``_warm_up`` and ``_serve`` (the loop after
    warm-up).
    """

    def __init__(self, waiting: WaitingQueue, thread_name: str) -> None:
        self._waiting = waiting
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
            self._waiting.push(seq)
            self._known[seq.request_id] = seq
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        with self._cv:
            seq = self._known.get(request_id)
            if seq is None:
                return
            if self._waiting.remove(seq):
                del self._known[request_id]
                seq.finish(FinishReason.CANCELLED)
            else:
                seq.abort_requested = True

    def close(self, timeout: float | None = None) -> None:
        """Cancels every waiting and running sequence and joins the loop thread."""
        with self._cv:
            self._closed = True
            for seq in self._waiting.drain():
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
