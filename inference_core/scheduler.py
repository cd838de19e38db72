"""The one-at-a-time engine loop: for models the batched runner does not support."""

from __future__ import annotations

import logging

import torch

from inference_core.admission import AdmissionQueue, FifoQueue, WaitingQueue
from inference_core.errors import EngineError
from inference_core.model_runner import TorchModelRunner
from inference_core.sequence import Sequence
from inference_core.types import FinishReason

log = logging.getLogger(__name__)


class SerialScheduler(AdmissionQueue):
    """Runs admitted sequences one at a time, to completion, on its own thread (so the asyncio loop never waits on
    torch). Admission, abort and close: see AdmissionQueue. ``waiting`` orders the queue (first come, first served by
    default; a FairQueue takes tenants in turn)."""

    def __init__(self, runner: TorchModelRunner, max_queue: int, waiting: WaitingQueue | None = None) -> None:
        super().__init__(FifoQueue(max_queue) if waiting is None else waiting, "inference-engine-loop")
        self._runner = runner

    def _warm_up(self) -> None:
        self._runner.warm_up()

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                seq = self._waiting.pop_next()
                if seq is None:
                    return
            try:
                self._run(seq)
            except Exception as e:
                log.exception("generation %s failed", seq.request_id)
                seq.fail(EngineError(f"generation failed inside the engine: {type(e).__name__}: {e}"))
            finally:
                with self._cv:
                    self._forget(seq)

    @torch.inference_mode()
    def _run(self, seq: Sequence) -> None:
        seq.mark_started()
        if seq.abort_requested:
            seq.finish(FinishReason.CANCELLED)
            return
        logits, cache = self._runner.prefill(seq.prompt_ids)
        while True:
            if seq.abort_requested:
                seq.finish(FinishReason.CANCELLED)
                return
            token_id = seq.select_token(logits)
            seq.append_token(token_id)
            if seq.finished:
                return
            logits = self._runner.decode(token_id, cache)
