"""benchmarks.bfcl_arguments refuses nonsense before loading a model."""

from __future__ import annotations

import sys

import pytest

from benchmarks import bfcl_arguments


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--limit", "-1"], "--limit must be >= 0"), (["--split", "dev"], "invalid choice: 'dev'")],
)
def test_bad_arguments_exit_2_naming_the_fix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    monkeypatch.setattr(sys, "argv", ["bfcl_arguments", *argv])
    monkeypatch.setattr(bfcl_arguments, "run", lambda args: pytest.fail("ran with bad arguments"))
    with pytest.raises(SystemExit) as exited:
        bfcl_arguments.main()
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
