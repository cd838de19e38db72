"""Approval tokens: a human's consent to one tool call, signed by the planner (HS256 JWT) and checked by the tools service.

A token is bound to the run, the call id, the tool and a hash of the exact arguments, and it expires. The key is a
random secret in a file both services read; whoever holds it can approve, so it is created with mode 0600.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt

from services.common.errors import PermissionDeniedError
from services.common.json_values import plain_numbers

_ALGORITHM = "HS256"
_AUDIENCE = "meshpilot-tools"
_ISSUER = "meshpilot-planner"
_KEY_BYTES = 32
_BOUND_CLAIMS = ("run", "call", "tool", "args")


def arguments_digest(arguments: dict[str, Any]) -> str:
    """SHA-256 of the arguments as canonical JSON (sorted keys; integral floats as ints, as Struct loses the difference)."""

    text = json.dumps(plain_numbers(arguments), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def load_or_create_key(path: Path) -> bytes:
    """The key in ``path``; a new random one is written there (0600, created atomically) if the file does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(_KEY_BYTES))
    key = path.read_text().strip()
    if len(key) < 32:
        raise ValueError(f"approval key file {path} holds fewer than 32 characters; delete it to have a new key made")
    return key.encode()


class ApprovalSigner:
    """Mints and verifies approval tokens with one shared key; ``clock`` returns Unix seconds."""

    def __init__(self, key: bytes, *, ttl_seconds: float = 300.0, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self.ttl_seconds = ttl_seconds
        self._clock = clock

    def mint(self, run_id: str, call_id: str, tool: str, arguments: dict[str, Any]) -> str:
        """A token that lets ``tool`` run once more with exactly ``arguments`` for this run and call, until it expires."""
        now = self._clock()
        claims = {
            "iss": _ISSUER,
            "aud": _AUDIENCE,
            "iat": int(now),
            "exp": int(now + self.ttl_seconds),
            "run": run_id,
            "call": call_id,
            "tool": tool,
            "args": arguments_digest(arguments),
        }
        return jwt.encode(claims, self._key, algorithm=_ALGORITHM)

    def verify(self, token: str, *, run_id: str, call_id: str, tool: str, arguments: dict[str, Any]) -> None:
        """Raises PermissionDeniedError unless ``token`` approves exactly this call and has not expired."""
        if not token:
            raise PermissionDeniedError(
                f"tool {tool!r} requires approval: call it through a planner run, where a human approves the call"
            )
        try:
            # Expiry is checked against our clock (injected in tests), not PyJWT's own reading of the time.
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[_ALGORITHM],
                audience=_AUDIENCE,
                issuer=_ISSUER,
                options={"require": ["exp", *_BOUND_CLAIMS], "verify_exp": False, "verify_iat": False},
            )
        except jwt.InvalidTokenError as e:
            raise PermissionDeniedError(f"the approval token for tool {tool!r} is not valid ({e})") from e
        if self._clock() >= claims["exp"]:
            raise PermissionDeniedError(f"the approval token for tool {tool!r} has expired; approve the call again")
        wanted = {"run": run_id, "call": call_id, "tool": tool, "args": arguments_digest(arguments)}
        mismatched = [name for name, value in wanted.items() if claims.get(name) != value]
        if mismatched:
            names = {"run": "run_id", "call": "call_id", "tool": "tool", "args": "arguments"}
            raise PermissionDeniedError(
                f"the approval token for tool {tool!r} was issued for another "
                f"{' and '.join(names[m] for m in mismatched)}; it approves only the call it was made for"
            )
