"""The loop thread of the openvino backend: admits sequences into the pipeline's process (openvino_stepper), and turns
what each of its steps produced into our chunks."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as Ids
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from inference_core.admission import AdmissionQueue, WaitingQueue
from inference_core.continuous import EngineStats
from inference_core.errors import EngineClosedError, EngineError
from inference_core.openvino_convert import finish_reason
from inference_core.openvino_stepper import NewRequest, Orders, StepReport
from inference_core.sequence import Sequence
from inference_core.types import FinishReason

log = logging.getLogger(__name__)


class PrefixIndex:
    """Estimates the prompt tokens the pipeline's prefix cache serves, which OpenVINO does not report per request.

    It mirrors the cache's rule: KV is reused in whole blocks of ``block_tokens``, keyed by every token up to the
    block's end, the last prompt token always computed; the ``capacity_tokens`` most recently used blocks are kept.
    An estimate: the pipeline may evict sooner (running requests hold blocks too).
    """

    def __init__(self, block_tokens: int, capacity_tokens: int) -> None:
        self._block = block_tokens
        self._capacity = max(1, capacity_tokens // block_tokens)
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def admit(self, ids: Ids[int]) -> int:
        """Records a prompt; returns how many of its tokens were cached before it."""
        cached = 0
        hit = True
        digest = hashlib.blake2b(digest_size=16)
        reusable = (len(ids) - 1) // self._block
        for i in range(len(ids) // self._block):
            digest.update(repr(ids[i * self._block : (i + 1) * self._block]).encode())
            key = digest.copy().digest()
            if hit and key in self._blocks and i < reusable:
                cached += self._block
                self._blocks.move_to_end(key)
            else:
                hit = False
                self._blocks[key] = None
                self._blocks.move_to_end(key)
        while len(self._blocks) > self._capacity:
            self._blocks.popitem(last=False)
        return cached


class Stepper(Protocol):
    """The pipeline's side, as the loop sees it: openvino_stepper.StepperProcess (or its serve() on a thread in tests)."""

    connection: Connection

    def ended(self) -> str:
        """How the other side ended, once its pipe has closed (for the error message)."""

    def close(self, timeout: float = 10.0) -> None:
        """Shuts the other side down."""


PipelineConfig = tuple[dict[str, Any], dict[str, str] | None]
"""A request's GenerationConfig and StructuredOutputConfig attributes (see openvino_stepper.NewRequest)."""


@dataclass
class _Running:
    seq: Sequence


class _WakingCondition(threading.Condition):
    """A Condition whose notify also wakes the loop thread, which waits on pipes rather than on the Condition."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def notify(self, n: int = 1) -> None:
        super().notify(n)
        self._wake()


class OpenVINOStepLoop(AdmissionQueue):
    """Feeds the pipeline's process from a WaitingQueue (admission, abort and close: see AdmissionQueue).

    - At most ``max_num_seqs`` sequences are in the pipeline; the rest wait in our queue, bounded and ordered by its
      policy. With a FairQueue a freed place goes to the waiting tenant holding the fewest; the pipeline cannot hand
      over a running request's place, so a newcomer waits for one to end (no preemption, unlike the torch engine).
    - The thread waits on the child's pipe and on a wake-up pipe (submit, abort, close), without the GIL. Adds and
      cancels gathered since the child's last step go in one message, which the child applies before its next step;
      while the thread turns a step's tokens into chunks, the child computes the next step.
    - An aborted sequence, or one that hit a stop string, is cancelled in the pipeline before the child's next step
      after it hears of it, which frees its KV blocks.
    - If the child dies, every waiting and running sequence fails with EngineClosedError, ``failure`` says why, and
      the loop takes no more requests.
    """

    def __init__(self, stepper: Stepper, waiting: WaitingQueue, max_num_seqs: int, prefix: PrefixIndex) -> None:
        super().__init__(waiting, "inference-openvino-loop")
        # Sockets rather than os.pipe(): once closed, a late wake-up fails on the object instead of writing to a
        # reused file descriptor number.
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_write.setblocking(False)
        self._cv = _WakingCondition(self._wake)
        self._stepper = stepper
        self._max_num_seqs = max_num_seqs
        self._prefix = prefix
        self._configs: dict[str, PipelineConfig] = {}
        self._running: dict[int, _Running] = {}  # by the pipeline's request id
        self._cancels: list[int] = []
        self._next_id = 0
        self._steps = 0
        self._generated = 0
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self._cache_usage = 0.0
        self._released = False
        self.failure: EngineClosedError | None = None
        """Why the loop stopped serving on its own (the pipeline's process died); None while it serves."""

    def submit(self, seq: Sequence, config: PipelineConfig = ({}, None)) -> None:  # type: ignore[override]
        with self._cv:
            self._configs[seq.request_id] = config
        try:
            super().submit(seq)
        except EngineError:
            with self._cv:
                self._configs.pop(seq.request_id, None)
            raise

    def abort(self, request_id: str) -> None:
        super().abort(request_id)
        self._wake()

    def close(self, timeout: float | None = None) -> None:
        """Cancels every waiting and running sequence, joins the loop thread and shuts the pipeline's process down."""
        super().close(timeout)
        if self._released:
            return
        self._released = True
        self._stepper.close()
        self._wake_write.close()
        if not self._thread.is_alive():
            self._wake_read.close()

    def stats(self) -> EngineStats:
        capacity = self._prefix._capacity * self._prefix._block
        with self._cv:
            slots: dict[str, int] = {}
            for running in self._running.values():
                slots[running.seq.tenant] = slots.get(running.seq.tenant, 0) + 1
            return EngineStats(
                waiting=len(self._waiting),
                running=len(self._running),
                kv_tokens_used=round(capacity * self._cache_usage / 100),
                kv_tokens_capacity=capacity,
                prefix_cache_hit_rate=self._cached_tokens / self._prompt_tokens if self._prompt_tokens else 0.0,
                generated_tokens=self._generated,
                steps=self._steps,
                waiting_by_tenant=self._waiting.waiting_by_tenant(),
                slots_by_tenant=slots,
            )

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full buffer wakes the loop already; a closed socket: we are done
            self._wake_write.send(b"\0")

    def _warm_up(self) -> None:
        pass  # the pipeline's process warms up before it reports ready

    def _serve(self) -> None:
        connection = self._stepper.connection
        try:
            while True:
                if self._wake_read in wait([connection, self._wake_read]):
                    self._wake_read.recv(4096)
                while connection.poll():
                    self._apply(connection.recv())
                orders = self._orders()
                if orders.add or orders.cancel:
                    connection.send(orders)
                with self._cv:
                    if self._closed and not self._running:
                        return
        except (EOFError, OSError):
            error = EngineClosedError(
                f"the OpenVINO pipeline's process {self._stepper.ended()}; this replica has stopped serving, "
                "retry on another (its log says why)"
            )
        except Exception as e:  # a bug of ours: the state is unknown, so stop rather than serve wrong tokens
            log.exception("the openvino loop failed")
            error = EngineClosedError(f"the openvino backend's loop failed ({str(e)[:300]}); retry on another replica")
        self._stop(error)

    def _orders(self) -> Orders:
        """The cancels and adds since the last message (admitting waiting sequences to the free places)."""
        aborted: list[Sequence] = []
        with self._cv:
            cancel, self._cancels = self._cancels, []
            for request_id, running in list(self._running.items()):
                if running.seq.abort_requested:
                    del self._running[request_id]
                    cancel.append(request_id)
                    aborted.append(running.seq)
            admitted = [] if self._closed else self._admit()
        for seq in aborted:
            self._end(seq, FinishReason.CANCELLED)
        add = [request for seq in admitted if (request := self._new_request(seq)) is not None]
        return Orders(add=add, cancel=cancel)

    def _admit(self) -> list[Sequence]:
        """Takes waiting sequences for the free places (called under the lock)."""
        admitted: list[Sequence] = []
        held: dict[str, int] = {}
        for running in self._running.values():
            held[running.seq.tenant] = held.get(running.seq.tenant, 0) + 1
        while len(self._running) + len(admitted) < self._max_num_seqs:
            tenant = self._waiting.next_tenant(held)
            if tenant is None:
                break
            seq = self._waiting.pop(tenant)
            held[tenant] = held.get(tenant, 0) + 1
            admitted.append(seq)
        return admitted

    def _new_request(self, seq: Sequence) -> NewRequest | None:
        with self._cv:
            generation, structured = self._configs.pop(seq.request_id, ({}, None))
        if seq.abort_requested:
            self._end(seq, FinishReason.CANCELLED)
            return None
        seq.cached_prompt_tokens = self._prefix.admit(seq.prompt_ids)
        self._prompt_tokens += len(seq.prompt_ids)
        self._cached_tokens += seq.cached_prompt_tokens
        seq.mark_started()
        self._next_id += 1
        with self._cv:
            self._running[self._next_id] = _Running(seq)
        return NewRequest(self._next_id, list(seq.prompt_ids), generation, structured)

    def _apply(self, report: StepReport) -> None:
        """Turns a step's tokens into chunks; what ended on our side is cancelled with the next message."""
        if report.stepped:
            self._steps += 1
            self._cache_usage = report.cache_usage
        for request_id, ids in report.tokens.items():
            item = self._running.get(request_id)
            if item is None:  # cancelled by us after the step began
                continue
            for token_id in ids:
                if item.seq.finished:
                    break
                self._generated += 1
                item.seq.append_token(token_id)
        for request_id, message in report.errors.items():
            if (item := self._pop(request_id)) is not None:
                item.seq.fail(EngineError(message))
                self._forget_locked(item.seq)
        for request_id, (status, finish) in report.finished.items():
            if (item := self._pop(request_id)) is not None:
                seq = item.seq
                self._end(seq, finish_reason(status, finish, len(seq.output_ids), seq.max_new_tokens))
        for request_id in report.tokens:
            item = self._running.get(request_id)
            if item is not None and item.seq.finished:  # a stop string or max_tokens, on our side
                self._pop(request_id)
                self._cancels.append(request_id)
                self._forget_locked(item.seq)

    def _pop(self, request_id: int) -> _Running | None:
        with self._cv:
            return self._running.pop(request_id, None)

    def _end(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish(reason)  # no-op when it finished on our side already
        self._forget_locked(seq)

    def _forget_locked(self, seq: Sequence) -> None:
        with self._cv:
            self._configs.pop(seq.request_id, None)
            self._forget(seq)

    def _stop(self, error: EngineClosedError) -> None:
        """Fails every waiting and running sequence with ``error`` and takes no more."""
        log.error("%s", error)
        with self._cv:
            self.failure = error
            self._closed = True
            ended = [running.seq for running in self._running.values()] + self._waiting.drain()
            self._running.clear()
            self._configs.clear()
            self._known.clear()
        for seq in ended:
            seq.fail(error)
