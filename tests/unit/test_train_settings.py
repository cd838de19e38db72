"""`meshpilot train`'s settings: every bad value is refused before any work, naming the option and what to change;
the command exits 2 for those and 1 when the mesh cannot be reached."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from meshpilot.cli import app
from services.train import TrainSettings, TrainSettingsError
from tests.conftest import free_port


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rounds": 0}, r"^--rounds is 0; use 1 or more"),
        ({"attempts": 0}, r"^--attempts is 0; use 1 or more"),
        ({"limit": -1}, r"^--limit is -1; use 0 or more"),
        ({"eval_limit": -2}, r"^--eval-limit is -2"),
        ({"keep_per_task": 0}, r"^--keep-per-task is 0"),
        ({"concurrency": 0}, r"^--concurrency is 0"),
        ({"lora_rank": 0}, r"^--lora-rank is 0"),
        ({"batch_size": 0}, r"^--batch-size is 0"),
        ({"grad_accumulation": 0}, r"^--grad-accumulation is 0"),
        ({"max_steps": -1}, r"^--max-steps is -1"),
        ({"save_steps": 0}, r"^--save-steps is 0"),
        ({"max_length": 8}, r"^--max-length is 8; use 16 or more"),
        ({"name": "Bad Name"}, r"^--name 'Bad Name': use 1-41 lowercase letters"),
        ({"temperature": 3.0}, r"^--temperature is 3; use 0 to 2"),
        ({"min_reward": 1.5}, r"^--min-reward is 1.5; use 0 to 1"),
        ({"precision": "fp8"}, r"^--precision is 'fp8'; use fp32, bf16, auto"),
        ({"method": "ppo"}, r"^--method is 'ppo'; use bc or grpo"),
        ({"method": "grpo", "student": "free"}, r"^--method grpo trains the rolled-out agent .*leave --student out"),
        ({"learning_rate": 0.0}, r"^--learning-rate is 0"),
        ({"epochs": 0.0}, r"^--epochs is 0; use a positive number, or set --max-steps"),
        ({"kd_alpha": -0.1}, r"^--kd-alpha is -0.1"),
        ({"kd_temperature": 0.0}, r"^--kd-temperature is 0"),
        ({"suite": ()}, r"^--suite: name at least one suite"),
        ({"eval_suite": ("kg-test", "bfcl-simple", "kg-test")}, r"^--eval-suite names kg-test twice; give each suite"),
    ],
)
def test_bad_settings_name_the_option(change: dict, message: str) -> None:
    with pytest.raises(TrainSettingsError, match=message):
        dataclasses.replace(TrainSettings(), **change).validate()


def test_a_teacher_that_is_not_a_model_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TrainSettingsError, match=r"^--teacher .*absent does not exist; give a HF model directory"):
        TrainSettings(teacher=tmp_path / "absent").validate()
    with pytest.raises(TrainSettingsError, match=r"^--teacher .* has no config.json; give a HF model directory"):
        TrainSettings(teacher=tmp_path).validate()
    (tmp_path / "config.json").write_text("{}")
    assert TrainSettings(teacher=tmp_path).validate().teacher == tmp_path


def test_the_defaults_are_valid_and_name_each_rounds_model() -> None:
    settings = TrainSettings().validate()
    assert [settings.model_id(n) for n in (1, 2)] == ["kg-r1", "kg-r2"]
    assert (settings.suite, settings.eval_suite) == (("kg-train",), ("kg-test",))
    assert TrainSettings(suite="mine.jsonl", eval_suite="theirs.jsonl").suite == ("mine.jsonl",)  # one name: one suite


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rounds", "0"], "--rounds is 0; use 1 or more"),
        (["--suite", "no-such-suite"], "--suite: no suite 'no-such-suite'"),
        (["--suite", "kg-train", "--suite", "kg-test"], "--suite 'kg-test' has no train tasks; choose another suite"),
        (["--eval-suite", "kg-test", "--eval-suite", "kg-train"], "--eval-suite 'kg-train' has no test tasks"),
        (["--suite", "kg-train", "--suite", "kg-train"], "--suite names kg-train twice"),
        (["--precision", "fp16"], "--precision is 'fp16'; use fp32, bf16, auto"),
        (["--method", "ppo"], "--method is 'ppo'; use bc or grpo"),
        (["--teacher", "/nonexistent/teacher"], "--teacher /nonexistent/teacher does not exist"),
        (["--demonstrations-for", "reverse:16"], "--demonstrations-for 'reverse:16': write CATEGORY=N"),
        (["--demonstrations-for", "nope=3"], "--demonstrations-for nope: 'kg-train' has no such train category"),
    ],
)
def test_the_command_exits_2_naming_the_option(args: list[str], message: str) -> None:
    done = CliRunner().invoke(app, ["train", *args])
    assert done.exit_code == 2, done.output
    assert f"error: {message}" in done.output


KG_AND_BFCL = [
    "--suite",
    "kg-train",
    "--suite",
    "bfcl-simple",
    "--eval-suite",
    "kg-test",
    "--eval-suite",
    "bfcl-simple",
]


@pytest.mark.parametrize("suites", [[], KG_AND_BFCL], ids=["kg", "kg and bfcl"])
def test_the_command_exits_1_when_the_planner_cannot_be_reached(tmp_path: Path, monkeypatch, suites) -> None:
    port = free_port()  # nothing listens there
    monkeypatch.setenv("MESHPILOT_DATA_DIR", str(tmp_path))
    args = ["train", *suites, "--limit", "1", "--planner", f"127.0.0.1:{port}", "--no-baseline"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 1, done.output
    assert "UNAVAILABLE" in done.output and "is the mesh up?" in done.output


def test_ctrl_c_exits_130_saying_the_same_command_resumes(tmp_path: Path, monkeypatch) -> None:
    import meshpilot.cli.train as command

    async def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what asyncio.run raises once Ctrl-C has cancelled the job

    monkeypatch.setattr(command, "_run", interrupted)
    monkeypatch.setenv("MESHPILOT_DATA_DIR", str(tmp_path))
    done = CliRunner().invoke(app, ["train", "--name", "j1", "--limit", "1", "--planner", "127.0.0.1:1"])
    assert done.exit_code == 130, done.output
    assert "stopped; what job 'j1' finished is kept: run the same command to resume" in done.output


@pytest.mark.parametrize(
    ("precision", "native", "bf16", "notice"),
    [
        ("auto", True, True, "--precision auto: training in bf16 mixed precision"),
        ("auto", False, False, "--precision auto: training in fp32 (no native bf16 here"),
        ("bf16", False, True, "warning: --precision bf16 on hardware without native bf16"),
        ("bf16", True, True, None),
        ("fp32", True, False, None),
    ],
)
def test_precision_auto_takes_bf16_only_where_the_hardware_has_it(
    tmp_path: Path, monkeypatch, precision: str, native: bool, bf16: bool, notice: str | None
) -> None:
    import meshpilot.cli.train as command
    from services.train import finetune

    monkeypatch.setattr(finetune, "native_bf16", lambda: native)
    assert finetune.uses_bf16(TrainSettings(precision=precision)) is bf16  # type: ignore[arg-type]

    async def unreachable(*args, **kwargs):
        raise RuntimeError("no mesh in this test")

    monkeypatch.setattr(command, "_run", unreachable)
    monkeypatch.setenv("MESHPILOT_DATA_DIR", str(tmp_path))
    done = CliRunner().invoke(app, ["train", "--limit", "1", "--precision", precision, "--planner", "127.0.0.1:1"])
    assert done.exit_code == 1 and "no mesh in this test" in done.output
    if notice is None:
        assert "bf16" not in done.output and "fp32" not in done.output
    else:
        assert notice in done.output


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, monkeypatch) -> None:
    from services.train.finetune import native_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpuinfo = tmp_path / "cpuinfo"
    for flags, native in (("fpu avx2 avx512f", False), ("avx512f avx512_bf16", True), ("amx_tile amx_bf16", True)):
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert native_bf16(cpuinfo) is native, flags
    assert native_bf16(tmp_path / "missing") is False


def test_services_train_exports_what_its_modules_define() -> None:
    import services.train

    modules = {
        "demonstrations",
        "examples",
        "finetune",
        "gguf_export",
        "grpo",
        "journal",
        "kd",
        "loop",
        "ray_backend",
        "rollouts",
        "settings",
        "suites",
    }
    public = {name for name in dir(services.train) if not name.startswith("_")} - modules
    assert set(services.train.__all__) == public
    assert all(getattr(services.train, name) is not None for name in services.train.__all__)
