"""The loop thread of the openvino backend: admits sequences into a ContinuousBatchingPipeline, steps it, and turns
what each step produced into our chunks."""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence as Ids
from dataclasses import dataclass
from typing import Any

from inference_core.admission import AdmissionQueue, WaitingQueue
from inference_core.continuous import EngineStats
from inference_core.errors import EngineError
from inference_core.openvino_convert import finish_reason
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


@dataclass
class _Running:
    seq: Sequence
    handle: Any
    read: int = 0  # generated tokens already appended to seq


class OpenVINOStepLoop(AdmissionQueue):
    """Feeds a ContinuousBatchingPipeline from a WaitingQueue (admission, abort and close: see AdmissionQueue).

    - At most ``max_num_seqs`` sequences are in the pipeline; the rest wait in our queue, bounded and ordered by its
      policy. With a FairQueue a freed place goes to the waiting tenant holding the fewest; the pipeline cannot hand
      over a running request's place, so a newcomer waits for one to end (no preemption, unlike the torch engine).
    - An aborted sequence, or one that hit a stop string, is cancelled in the pipeline before the next step, which
      frees its KV blocks.
    """

    def __init__(self, pipeline: Any, waiting: WaitingQueue, max_num_seqs: int, prefix: PrefixIndex) -> None:
        super().__init__(waiting, "inference-openvino-loop")
        self._pipeline = pipeline
        self._max_num_seqs = max_num_seqs
        self._prefix = prefix
        self._configs: dict[str, Any] = {}
        self._running: dict[str, _Running] = {}
        self._next_id = 0
        self._steps = 0
        self._generated = 0
        self._prompt_tokens = 0
        self._cached_tokens = 0

    def submit(self, seq: Sequence, generation_config: Any = None) -> None:  # type: ignore[override]
        with self._cv:
            self._configs[seq.request_id] = generation_config
        try:
            super().submit(seq)
        except EngineError:
            with self._cv:
                self._configs.pop(seq.request_id, None)
            raise

    def stats(self) -> EngineStats:
        metrics = self._pipeline.get_metrics()
        capacity = self._prefix._capacity * self._prefix._block
        with self._cv:
            slots: dict[str, int] = {}
            for running in self._running.values():
                slots[running.seq.tenant] = slots.get(running.seq.tenant, 0) + 1
            return EngineStats(
                waiting=len(self._waiting),
                running=len(self._running),
                kv_tokens_used=round(capacity * metrics.cache_usage / 100),
                kv_tokens_capacity=capacity,
                prefix_cache_hit_rate=self._cached_tokens / self._prompt_tokens if self._prompt_tokens else 0.0,
                generated_tokens=self._generated,
                steps=self._steps,
                waiting_by_tenant=self._waiting.waiting_by_tenant(),
                slots_by_tenant=slots,
            )

    def _warm_up(self) -> None:
        import numpy as np
        import openvino as ov
        import openvino_genai as ov_genai

        config = ov_genai.GenerationConfig()
        config.max_new_tokens = 2
        handle = self._pipeline.add_request(self._new_id(), ov.Tensor(np.array([[1, 2, 3, 4]], dtype=np.int64)), config)
        while self._pipeline.has_non_finished_requests():
            self._pipeline.step()
        del handle

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._running and not len(self._waiting):
                    self._cv.wait()
                if self._closed and not self._running:
                    return
                admitted = self._admit()
            for seq in admitted:
                self._add(seq)
            self._drop_ended()
            if self._pipeline.has_non_finished_requests():
                try:
                    self._pipeline.step()
                except Exception as e:  # the pipeline's state is unknown now: fail what runs, keep serving new ones
                    log.exception("openvino step failed")
                    self._fail_running(EngineError(f"the OpenVINO pipeline failed a step: {str(e)[:300]}"))
                    continue
                self._steps += 1
            self._collect()

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

    def _add(self, seq: Sequence) -> None:
        import numpy as np
        import openvino as ov

        with self._cv:
            config = self._configs.pop(seq.request_id, None)
        if seq.abort_requested:
            self._end(seq, FinishReason.CANCELLED)
            return
        seq.cached_prompt_tokens = self._prefix.admit(seq.prompt_ids)
        self._prompt_tokens += len(seq.prompt_ids)
        self._cached_tokens += seq.cached_prompt_tokens
        seq.mark_started()
        try:
            ids = ov.Tensor(np.asarray([seq.prompt_ids], dtype=np.int64))
            handle = self._pipeline.add_request(self._new_id(), ids, config)
        except Exception as e:  # a config the pipeline rejects, e.g. a grammar its own compiler refuses
            seq.fail(EngineError(f"OpenVINO refused the request: {str(e)[:300]}"))
            self._forget_locked(seq)
            return
        with self._cv:
            self._running[seq.request_id] = _Running(seq, handle)

    def _drop_ended(self) -> None:
        """Cancels, before the next step, what was aborted or has ended on our side (stop string, max tokens)."""
        with self._cv:
            ended = [r for r in self._running.values() if r.seq.abort_requested or r.seq.finished]
        for running in ended:
            running.handle.cancel()
            self._end(running.seq, FinishReason.CANCELLED)

    def _collect(self) -> None:
        with self._cv:
            running = list(self._running.values())
        for item in running:
            seq = item.seq
            status = item.handle.get_status().name
            if item.handle.can_read():
                for output in item.handle.read().values():
                    self._append(item, list(output.generated_ids))
            if seq.finished:  # by a stop string or max_tokens on our side: the place is free for the next step
                if status == "RUNNING":
                    item.handle.cancel()
                self._forget_locked(seq)
                continue
            if status != "RUNNING":
                outputs = item.handle.read_all()
                output = outputs[0] if outputs else None
                if output is not None:
                    self._append(item, list(output.generated_ids)[item.read :])
                if not seq.finished:
                    reason = finish_reason(
                        status, output.finish_reason.name if output else "", len(seq.output_ids), seq.max_new_tokens
                    )
                    self._end(seq, reason)

    def _append(self, item: _Running, ids: list[int]) -> None:
        for token_id in ids:
            if item.seq.finished:
                return
            item.read += 1
            self._generated += 1
            item.seq.append_token(token_id)

    def _end(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish(reason)
        self._forget_locked(seq)

    def _forget_locked(self, seq: Sequence) -> None:
        with self._cv:
            self._running.pop(seq.request_id, None)
            self._configs.pop(seq.request_id, None)
            self._forget(seq)

    def _fail_running(self, error: EngineError) -> None:
        with self._cv:
            running = list(self._running.values())
        for item in running:
            item.handle.cancel()
            item.seq.fail(error)
            self._forget_locked(item.seq)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id
