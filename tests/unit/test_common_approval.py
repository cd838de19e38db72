"""Approval tokens: bound to run, call, tool and arguments; expiring by the injected clock; key files made 0600."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jwt
import pytest

from services.common import PermissionDeniedError
from services.common.approval import ApprovalSigner, arguments_digest, load_or_create_key

KEY = b"k" * 32
ARGUMENTS = {"text": "buy milk", "count": 2}


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def verify(
    signer: ApprovalSigner,
    token: str,
    *,
    run_id: str = "run-1",
    call_id: str = "call-1",
    tool: str = "append_note",
    arguments: dict[str, Any] = ARGUMENTS,
) -> None:
    signer.verify(token, run_id=run_id, call_id=call_id, tool=tool, arguments=arguments)


def test_token_verifies_for_the_call_it_was_minted_for() -> None:
    signer = ApprovalSigner(KEY)
    token = signer.mint("run-1", "call-1", "append_note", ARGUMENTS)
    verify(signer, token)
    # Struct delivers integers as doubles and dict order is not the caller's concern.
    verify(signer, token, arguments={"count": 2.0, "text": "buy milk"})


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"run_id": "run-2"}, "run_id"),
        ({"call_id": "call-2"}, "call_id"),
        ({"tool": "calculator"}, "tool"),
        ({"arguments": {"text": "buy milk", "count": 3}}, "arguments"),
        ({"run_id": "run-2", "arguments": {}}, "run_id and arguments"),
    ],
)
def test_each_mismatch_is_denied_naming_it(overrides: dict[str, Any], names: str) -> None:
    signer = ApprovalSigner(KEY)
    token = signer.mint("run-1", "call-1", "append_note", ARGUMENTS)
    with pytest.raises(PermissionDeniedError, match=f"was issued for another {names}; it approves only"):
        verify(signer, token, **overrides)


def test_token_expires_after_its_ttl_by_the_injected_clock() -> None:
    clock = FakeClock()
    signer = ApprovalSigner(KEY, ttl_seconds=300, clock=clock)
    token = signer.mint("run-1", "call-1", "append_note", ARGUMENTS)
    clock.now += 299
    verify(signer, token)
    clock.now += 1
    with pytest.raises(PermissionDeniedError, match="has expired; approve the call again"):
        verify(signer, token)


def test_empty_token_asks_for_approval() -> None:
    with pytest.raises(PermissionDeniedError, match="tool 'append_note' requires approval: call it through a planner"):
        verify(ApprovalSigner(KEY), "")


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b.c",
        ApprovalSigner(b"x" * 32).mint("run-1", "call-1", "append_note", ARGUMENTS),
        jwt.encode({"aud": "meshpilot-tools", "iss": "meshpilot-planner", "exp": 2**40}, KEY, algorithm="HS256"),
        jwt.encode(
            {"aud": "someone-else", "iss": "meshpilot-planner", "exp": 2**40, "run": "run-1", "call": "call-1",
             "tool": "append_note", "args": arguments_digest(ARGUMENTS)},
            KEY,
            algorithm="HS256",
        ),
    ],
    ids=["garbage", "not-base64", "other-key", "missing-claims", "other-audience"],
)  # fmt: skip
def test_invalid_tokens_are_denied(token: str) -> None:
    with pytest.raises(PermissionDeniedError, match="the approval token for tool 'append_note' is not valid"):
        verify(ApprovalSigner(KEY), token)


def test_arguments_digest_ignores_key_order_and_integral_floats() -> None:
    assert arguments_digest({"a": 1, "b": [2.0, {"c": 3}]}) == arguments_digest({"b": [2, {"c": 3.0}], "a": 1.0})
    assert arguments_digest({"a": 1}) != arguments_digest({"a": 1.5})
    assert arguments_digest({"a": "1"}) != arguments_digest({"a": 1})


def test_key_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "approval.key"
    key = load_or_create_key(path)
    assert len(key) >= 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(path) == key
    assert load_or_create_key(tmp_path / "other.key") != key


def test_short_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "approval.key"
    path.write_text("short\n")
    with pytest.raises(ValueError, match="fewer than 32 characters; delete it to have a new key made"):
        load_or_create_key(path)
