"""The openvino backend's pipeline process on a scripted stand-in for ContinuousBatchingPipeline: a real child process
that loads, reports its load errors, shuts down without leaving a process behind, and dies with its parent.

FakePipeline behaves as the real one does here (one token per request per step, a stop token read like any other, a
cancelled request gone after the next step); test_openvino_loop drives the engine's loop over it too.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("openvino_genai", reason="openvino-genai is not installed (`make install` adds the openvino extra)")

from inference_core.errors import EngineError
from inference_core.openvino_stepper import (
    NewRequest,
    Orders,
    PipelineLoader,
    PipelineStepper,
    Ready,
    StepperProcess,
    StepReport,
)

VOCAB = 97
EOS = 0
REPO = Path(__file__).resolve().parents[2]


def next_token(history: list[int]) -> int:
    return 1 + zlib.crc32(repr(history).encode()) % (VOCAB - 1)


def alone(prompt: list[int], n: int) -> list[int]:
    """The tokens FakePipeline generates for ``prompt`` without a stop token."""
    history, out = list(prompt), []
    for _ in range(n):
        out.append(next_token(history))
        history.append(out[-1])
    return out


class FakeHandle:
    def __init__(self, prompt: list[int], config: Any) -> None:
        self.history = list(prompt)
        self.max_new_tokens = config.max_new_tokens
        self.stop_token_ids = set(config.stop_token_ids)
        self.generated: list[int] = []
        self.unread: list[int] = []
        self.status = "RUNNING"
        self.finish = "NONE"

    def can_read(self) -> bool:
        return bool(self.unread)

    def read(self) -> dict[int, Any]:
        assert self.unread, "read() blocks when nothing is pending"
        ids, self.unread = self.unread, []
        return {0: SimpleNamespace(generated_ids=ids, finish_reason=SimpleNamespace(name=self.finish))}

    def read_all(self) -> list[Any]:
        return []

    def get_status(self) -> Any:
        return SimpleNamespace(name=self.status)

    def cancel(self) -> None:
        if self.status == "RUNNING":
            self.status = "CANCEL"


class FakePipeline:
    """Decodes next_token(history) for every running request each step, until a stop token or max_new_tokens."""

    def __init__(
        self,
        fail_on_step: int | None = None,
        refuse_add: bool = False,
        fail_load: str = "",
        prompt_lookup: bool = False,
    ) -> None:
        if fail_load:
            raise EngineError(fail_load)
        self.prompt_lookup = prompt_lookup  # as the real one built with prompt lookup: requests must carry a draft
        self.handles: list[FakeHandle] = []
        self.steps = 0
        self.fail_on_step = fail_on_step
        self.refuse_add = refuse_add
        self.max_live = 0

    def add_request(self, request_id: int, ids: Any, config: Any) -> FakeHandle:
        if self.refuse_add and request_id > 0:  # 0 is the warm-up
            raise RuntimeError("bad grammar")
        if self.prompt_lookup and not getattr(config, "num_assistant_tokens", 0):
            raise RuntimeError("`max_ngram_size` && `num_assistant_tokens` should be specified")
        handle = FakeHandle([int(t) for t in ids.data[0]], config)
        self.handles.append(handle)
        return handle

    def has_non_finished_requests(self) -> bool:
        return any(h.status in ("RUNNING", "CANCEL") for h in self.handles)

    def step(self) -> None:
        self.steps += 1
        if self.fail_on_step is not None and self.steps == self.fail_on_step:
            raise RuntimeError("out of memory")
        live = [h for h in self.handles if h.status in ("RUNNING", "CANCEL")]
        self.max_live = max(self.max_live, len(live))
        for handle in live:
            if handle.status == "CANCEL":
                handle.status = "IGNORED"
                continue
            token = next_token(handle.history)
            handle.history.append(token)
            handle.generated.append(token)
            handle.unread.append(token)
            stopped = token in handle.stop_token_ids
            if stopped or len(handle.generated) >= handle.max_new_tokens:
                handle.status = "FINISHED"
                handle.finish = "STOP" if stopped else "LENGTH"
        self.handles = [h for h in self.handles if h.status != "IGNORED"]

    def live(self) -> int:
        return sum(h.status == "RUNNING" for h in self.handles)

    def get_config(self) -> Any:
        return SimpleNamespace(stop_token_ids={EOS})

    def get_metrics(self) -> Any:
        return SimpleNamespace(cache_usage=10.0)


def new_request(request_id: int, prompt: list[int], max_new_tokens: int) -> NewRequest:
    return NewRequest(request_id, prompt, {"max_new_tokens": max_new_tokens, "stop_token_ids": {EOS}})


def until_idle(stepper: PipelineStepper) -> list[StepReport]:
    reports = []
    while stepper.busy:
        reports.append(stepper.step())
    return reports


def test_each_step_reports_new_tokens_and_the_pipelines_own_finish() -> None:
    stepper = PipelineStepper(FakePipeline())
    assert stepper.warm_up() == Ready(frozenset({EOS}))
    stepper.apply(Orders(add=[new_request(1, [1, 2, 3], 3), new_request(2, [4, 5], 2)]))
    reports = until_idle(stepper)
    assert [r.tokens for r in reports] == [
        {1: alone([1, 2, 3], 1), 2: alone([4, 5], 1)},
        {1: alone([1, 2, 3], 2)[1:], 2: alone([4, 5], 2)[1:]},
        {1: alone([1, 2, 3], 3)[2:]},
    ]
    assert reports[1].finished == {2: ("FINISHED", "LENGTH")}
    assert reports[2].finished == {1: ("FINISHED", "LENGTH")}
    assert all(r.stepped and r.cache_usage == 10.0 for r in reports)


def test_a_prompt_lookup_pipelines_warm_up_carries_a_draft_length() -> None:
    loader = PipelineLoader("ir", {}, {}, prompt_lookup_tokens=3)
    assert loader.warm_up_generation == {"max_new_tokens": 2, "num_assistant_tokens": 3, "max_ngram_size": 3}
    assert PipelineLoader("ir", {}, {}).warm_up_generation == {"max_new_tokens": 2}
    with pytest.raises(RuntimeError, match="num_assistant_tokens"):
        PipelineStepper(FakePipeline(prompt_lookup=True)).warm_up()
    stepper = PipelineStepper(FakePipeline(prompt_lookup=True), loader.warm_up_generation)
    assert stepper.warm_up() == Ready(frozenset({EOS}))


def test_a_cancel_frees_the_request_before_the_next_step() -> None:
    pipeline = FakePipeline()
    stepper = PipelineStepper(pipeline)
    stepper.apply(Orders(add=[new_request(1, [1, 2, 3], 1000)]))
    assert stepper.step().tokens == {1: alone([1, 2, 3], 1)}
    stepper.apply(Orders(cancel=[1]))
    assert stepper.step().tokens == {}  # the cancelled request computes nothing more
    assert pipeline.handles == [] and not stepper.busy


def test_a_refused_request_and_a_failed_step_end_as_errors() -> None:
    stepper = PipelineStepper(FakePipeline(refuse_add=True))
    stepper.apply(Orders(add=[new_request(1, [1], 3)]))
    assert stepper.step().errors == {1: "OpenVINO refused the request: bad grammar"}
    stepper = PipelineStepper(FakePipeline(fail_on_step=2))
    stepper.apply(Orders(add=[new_request(1, [1], 3), new_request(2, [2], 3)]))
    stepper.step()
    report = stepper.step()
    assert report.errors == dict.fromkeys([1, 2], "the OpenVINO pipeline failed a step: out of memory")
    assert not stepper.busy  # no retrying a broken step on its own
    stepper.apply(Orders(add=[new_request(3, [3], 1)]))
    assert until_idle(stepper)[-1].finished == {3: ("FINISHED", "LENGTH")}


def test_the_process_serves_and_shuts_down_without_leaving_a_process() -> None:
    stepper = StepperProcess(FakePipeline)
    assert stepper.wait_ready() == Ready(frozenset({EOS}))
    stepper.connection.send(Orders(add=[new_request(1, [1, 2, 3], 2)]))
    tokens: list[int] = []
    while not (report := stepper.connection.recv()).finished:
        tokens += report.tokens.get(1, [])
    tokens += report.tokens.get(1, [])
    assert tokens == alone([1, 2, 3], 2)
    stepper.close()
    assert stepper._process.returncode == 0  # it exited when told, nobody killed it
    assert not alive(stepper.pid)


def test_a_load_error_is_an_engine_error_saying_why() -> None:
    stepper = StepperProcess(functools.partial(FakePipeline, fail_load="OpenVINO could not load model.xml: corrupt"))
    with pytest.raises(EngineError, match=r"OpenVINO could not load model\.xml: corrupt"):
        stepper.wait_ready()
    assert not alive(stepper.pid)


def test_a_child_that_dies_while_loading_is_an_engine_error() -> None:
    stepper = StepperProcess(functools.partial(os._exit, 3))
    with pytest.raises(EngineError, match="process exited with status 3 while loading the model"):
        stepper.wait_ready()


def test_a_load_that_hangs_is_stopped_after_the_timeout() -> None:
    stepper = StepperProcess(functools.partial(time.sleep, 120))
    with pytest.raises(EngineError, match=r"did not load the model within 0\.5s; it was stopped"):
        stepper.wait_ready(timeout_s=0.5)
    assert not alive(stepper.pid)


def test_the_child_dies_with_a_killed_parent(tmp_path: Path) -> None:
    """A SIGKILLed service cannot shut its pipeline down: the child notices its pipe closing and exits."""
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import pathlib, time
                from inference_core.openvino_stepper import Orders, NewRequest, StepperProcess
                from tests.unit.test_openvino_stepper import FakePipeline, new_request
                stepper = StepperProcess(FakePipeline)
                stepper.wait_ready()
                stepper.connection.send(Orders(add=[new_request(1, [1, 2, 3], 10**9)]))  # steps without end
                pathlib.Path({str(pid_file)!r}).write_text(str(stepper.pid))
                time.sleep(600)
            """),
        ],
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert parent.poll() is None and time.monotonic() < deadline, "the parent did not start its child"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30
        while alive(child):
            assert time.monotonic() < deadline, "the child outlived its killed parent"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
