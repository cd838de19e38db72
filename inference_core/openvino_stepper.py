"""The openvino backend's pipeline process: owns a ContinuousBatchingPipeline and steps it, told what to add and cancel
by the engine over a pipe, and reports each step's new token ids back.

Why a process: the pipeline's step() holds Python's GIL for the whole step (a thread ticking every 1 ms ticked once per
step beside it), so in the service's process nothing else ran while the model computed: not gRPC streaming, not the
tokenizing of a new prompt, not the detokenizing of each row. Here the step holds this process's GIL only.

Messages (pickled over a socket pair; the parent sends the loader first):
    parent -> child: Orders (requests to add, ids to cancel, shutdown), batched: all since the child's last step.
    child -> parent: Ready or LoadFailed once, then one StepReport per step.
The child dies with its parent: it reads the pipe between steps and blocks on it when idle, so the parent's end
closing (a SIGKILL included) ends it at once or after the step under way.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from inference_core.errors import EngineError
from inference_core.openvino_convert import prompt_lookup_fields

log = logging.getLogger(__name__)

WARM_UP_ID = 0
# Loading and compiling the IR of SmolLM2-135M takes seconds; a larger model on a busy node, minutes.
LOAD_TIMEOUT_S = 900.0
"""The warm-up request's id in the pipeline; the engine numbers its requests from 1."""


@dataclass(frozen=True)
class NewRequest:
    """A request for the pipeline: the engine's id for it, its prompt's token ids, and its GenerationConfig and
    StructuredOutputConfig attributes as plain data (openvino_convert.generation_fields / structured_fields)."""

    request_id: int
    prompt_ids: list[int]
    generation: dict[str, Any]
    structured: dict[str, str] | None = None


@dataclass
class Orders:
    """Everything the engine asks since its last message; the child applies it before its next step."""

    add: list[NewRequest] = field(default_factory=list)
    cancel: list[int] = field(default_factory=list)
    shutdown: bool = False


@dataclass
class StepReport:
    """What one step did. tokens: new token ids per request id. finished: the requests the pipeline ended by itself,
    as (status name, finish reason name). errors: requests that ended with an error (refused by add_request, or a
    failed step), with the message for the client. cache_usage: the KV cache's use in percent after the step."""

    tokens: dict[int, list[int]] = field(default_factory=dict)
    finished: dict[int, tuple[str, str]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    stepped: bool = False
    cache_usage: float = 0.0


@dataclass(frozen=True)
class Ready:
    """The pipeline is loaded and warmed up; stop_token_ids are those of the model's own generation config."""

    stop_token_ids: frozenset[int]


@dataclass(frozen=True)
class LoadFailed:
    """The pipeline could not be loaded or warmed up; message says what to change."""

    message: str


@dataclass(frozen=True)
class PipelineLoader:
    """Loads the ContinuousBatchingPipeline over the IR in ``ir_dir`` on CPU (called in the child; pickled there).

    prompt_lookup_tokens > 0 builds the pipeline with OpenVINO's prompt lookup, which refuses every request whose
    GenerationConfig lacks a draft length: the warm-up request gets one too (``warm_up_generation``)."""

    ir_dir: str
    scheduler: dict[str, Any]
    properties: dict[str, Any]
    prompt_lookup_tokens: int = 0

    @property
    def warm_up_generation(self) -> dict[str, Any]:
        return {"max_new_tokens": 2, **prompt_lookup_fields(self.prompt_lookup_tokens)}

    def __call__(self) -> Any:
        try:
            import openvino_genai as ov_genai
        except ImportError as e:
            raise EngineError(
                f"inference.backend 'openvino' needs openvino-genai ({e}); run `make install-openvino`"
            ) from e
        config = ov_genai.SchedulerConfig()
        for name, value in self.scheduler.items():
            setattr(config, name, value)
        properties = dict(self.properties)
        if self.prompt_lookup_tokens:
            properties["prompt_lookup"] = True
        try:
            return ov_genai.ContinuousBatchingPipeline(self.ir_dir, config, "CPU", properties)
        except RuntimeError as e:
            raise EngineError(f"OpenVINO could not load {self.ir_dir}: {str(e)[:500]}") from e


def generation_config(generation: dict[str, Any], structured: dict[str, str] | None) -> Any:
    """An ``openvino_genai.GenerationConfig`` from a NewRequest's plain data."""
    import openvino_genai as ov_genai

    config = ov_genai.GenerationConfig()
    for name, value in generation.items():
        setattr(config, name, value)
    if structured:
        structured_config = ov_genai.StructuredOutputConfig()
        for name, value in structured.items():
            setattr(structured_config, name, value)
        config.structured_output_config = structured_config
    return config


def prompt_tensor(ids: list[int]) -> Any:
    import numpy as np
    import openvino as ov

    return ov.Tensor(np.asarray([ids], dtype=np.int64))


class PipelineStepper:
    """The child's side: applies Orders to the pipeline, steps it, and reports what the step produced."""

    def __init__(self, pipeline: Any, warm_up_generation: dict[str, Any] | None = None) -> None:
        self._pipeline = pipeline
        self._warm_up_generation = warm_up_generation or {"max_new_tokens": 2}
        self._handles: dict[int, Any] = {}
        self._sent: dict[int, int] = {}  # generated tokens reported so far, per request
        self._errors: dict[int, str] = {}
        self._step_failed = False

    def warm_up(self) -> Ready:
        """One tiny request, so one-time costs are paid before serving."""
        handle = self._pipeline.add_request(
            WARM_UP_ID, prompt_tensor([1, 2, 3, 4]), generation_config(self._warm_up_generation, None)
        )
        while self._pipeline.has_non_finished_requests():
            self._pipeline.step()
        del handle
        return Ready(frozenset(int(t) for t in self._pipeline.get_config().stop_token_ids))

    @property
    def busy(self) -> bool:
        """Whether there is a step to take (a cancelled request's KV is freed by the next step too)."""
        if self._handles or self._errors:
            return True
        return not self._step_failed and self._pipeline.has_non_finished_requests()

    def apply(self, orders: Orders) -> None:
        for request_id in orders.cancel:
            handle = self._handles.pop(request_id, None)
            self._sent.pop(request_id, None)
            if handle is not None:
                handle.cancel()
        for request in orders.add:
            try:
                config = generation_config(request.generation, request.structured)
                handle = self._pipeline.add_request(request.request_id, prompt_tensor(request.prompt_ids), config)
            except Exception as e:  # a config the pipeline rejects, e.g. a grammar its own compiler refuses
                self._errors[request.request_id] = f"OpenVINO refused the request: {str(e)[:300]}"
                continue
            self._handles[request.request_id] = handle
            self._sent[request.request_id] = 0
            self._step_failed = False

    def shutdown(self) -> None:
        """Cancels every running request (the process exits next)."""
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()

    def step(self) -> StepReport:
        report = StepReport(errors=self._errors)
        self._errors = {}
        if self._pipeline.has_non_finished_requests():
            try:
                self._pipeline.step()
            except Exception as e:  # the pipeline's state is unknown now: fail what runs, keep serving new ones
                log.exception("openvino step failed")
                self._step_failed = True
                message = f"the OpenVINO pipeline failed a step: {str(e)[:300]}"
                for request_id in list(self._handles):
                    self._handles.pop(request_id).cancel()
                    self._sent.pop(request_id, None)
                    report.errors[request_id] = message
                return report
            report.stepped = True
        for request_id, handle in list(self._handles.items()):
            self._collect(request_id, handle, report)
        report.cache_usage = float(self._pipeline.get_metrics().cache_usage)
        return report

    def _collect(self, request_id: int, handle: Any, report: StepReport) -> None:
        status = handle.get_status().name
        ids: list[int] = []
        finish = ""
        while handle.can_read():
            for output in handle.read().values():
                ids.extend(output.generated_ids)
                finish = output.finish_reason.name
        sent = self._sent[request_id] + len(ids)
        if status != "RUNNING":
            outputs = handle.read_all()
            if outputs:
                ids.extend(list(outputs[0].generated_ids)[sent:])
                finish = outputs[0].finish_reason.name
            report.finished[request_id] = (status, finish)
            del self._handles[request_id], self._sent[request_id]
        else:
            self._sent[request_id] = sent
        if ids:
            report.tokens[request_id] = ids


def serve(connection: Connection, load: Callable[[], Any]) -> None:
    """The child's loop: load, report Ready or LoadFailed, then apply orders and step while there is work, blocking on
    the pipe when idle; returns on shutdown or when the parent's end is gone. A PipelineLoader also says what the
    warm-up request needs; any other callable returning a pipeline gets the plain one."""
    try:
        warm_up = load.warm_up_generation if isinstance(load, PipelineLoader) else None
        stepper = PipelineStepper(load(), warm_up)
        ready: Ready | LoadFailed = stepper.warm_up()
    except EngineError as e:
        ready = LoadFailed(str(e))
    except Exception as e:
        log.exception("loading the OpenVINO pipeline failed")
        ready = LoadFailed(f"the OpenVINO pipeline failed to load or warm up: {type(e).__name__}: {str(e)[:500]}")
    try:
        connection.send(ready)
        if isinstance(ready, LoadFailed):
            return
        while True:
            pending = [] if stepper.busy else [connection.recv()]
            while connection.poll():
                pending.append(connection.recv())
            for orders in pending:
                if orders.shutdown:
                    stepper.shutdown()
                    return
                stepper.apply(orders)
            connection.send(stepper.step())
    except (EOFError, OSError):
        return  # the engine is gone


class StepperProcess:
    """The pipeline's process, seen from the engine: ``connection`` carries Orders there and StepReports back."""

    def __init__(self, load: Callable[[], Any]) -> None:
        """Spawns the child and hands it ``load`` (a picklable callable returning the pipeline); does not wait."""
        ours, theirs = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the child holds its own copy; ours must go, or its death would not reach us as EOF
        self.connection = Connection(ours.detach())
        self.connection.send(sys.path)  # so the child finds what the loader's pickle names, as we do
        self.connection.send(load)

    @property
    def pid(self) -> int:
        return self._process.pid

    def wait_ready(self, timeout_s: float = LOAD_TIMEOUT_S) -> Ready:
        """Blocks until the pipeline is loaded; raises EngineError saying why when it is not, or when it has not
        loaded within ``timeout_s`` (the child is then killed: a load that hangs must not keep the service starting
        forever)."""
        try:
            if not self.connection.poll(timeout_s):
                self.kill()
                raise EngineError(
                    f"the OpenVINO pipeline's process did not load the model within {timeout_s:g}s; it was stopped"
                )
            message = self.connection.recv()
        except (EOFError, OSError):
            raise EngineError(
                f"the OpenVINO pipeline's process {self.ended()} while loading the model (its log is above)"
            ) from None
        if isinstance(message, LoadFailed):
            self.kill()
            raise EngineError(message.message)
        assert isinstance(message, Ready)
        return message

    def ended(self) -> str:
        """How the child ended, for an error message (once its pipe has closed)."""
        try:
            code = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def kill(self) -> None:
        """Ends the child at once (a load abandoned halfway: nothing to cancel)."""
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self.connection.close()

    def close(self, timeout: float = 10.0) -> None:
        """Asks the child to cancel everything and exit; kills it if it has not within ``timeout`` seconds."""
        if self._process.poll() is None:
            with contextlib.suppress(OSError):  # it died meanwhile
                self.connection.send(Orders(shutdown=True))
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("the OpenVINO pipeline's process did not exit in %.0f s; killing it", timeout)
                self._process.kill()
                self._process.wait()
        self.connection.close()


def main() -> None:
    # Ctrl-C in a terminal reaches the whole process group; the engine decides when this process ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s openvino-stepper %(levelname)s %(message)s")
    connection = Connection(int(sys.argv[1]))
    try:
        sys.path[:] = connection.recv()
        load = connection.recv()
    except (EOFError, OSError):
        return
    except Exception as e:
        connection.send(LoadFailed(f"the OpenVINO pipeline's process could not read its loader: {e}"))
        return
    serve(connection, load)


if __name__ == "__main__":
    # Through the package, so what this process pickles names inference_core.openvino_stepper, not __main__.
    from inference_core.openvino_stepper import main as package_main

    package_main()
