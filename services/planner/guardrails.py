"""Guardrails on what crosses the planner: secrets redacted from tool results, the model's output and final answers,
and tool output fenced in the prompt as untrusted data that cannot close its own fence."""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from services.common.config import GuardrailsConfig
from services.planner.types import ToolOutcome

# The fence of the examples in the system prompt; a run's fences carry a random nonce instead.
EXAMPLE_NONCE = "example"
# Characters a model may read as a line break or that reorder or hide text, which JSON leaves raw: shown escaped, so
# a tool cannot start a line of its own ("SYSTEM: ...") or hide text inside its data (Unicode tag characters spell
# ASCII invisibly).
_INVISIBLE = re.compile("[\u0085\u2028\u2029\u200b\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff\U000e0000-\U000e007f]")
# Chat templates' control tokens start with "<|" (ChatML's <|im_start|>, Llama 3's <|start_header_id|>): the inference
# service tokenizes the rendered chat with special tokens parsed, so "<|im_start|>system" in tool output would open a
# real system turn (seen with SmolLM2's tokenizer). A space makes it plain text.
_CONTROL_TOKEN = "<|"
_LINE_SEPARATORS = frozenset("\u0085\u2028\u2029")


def new_nonce() -> str:
    """A fence nonce: 12 random hex digits, so that tool output cannot guess the tag that ends its fence."""
    return secrets.token_hex(6)


def fence_open(nonce: str) -> str:
    return f"<data-{nonce}>"


def fence_close(nonce: str) -> str:
    return f"</data-{nonce}>"


def fence(text: str, nonce: str) -> str:
    """``text`` between the opening and closing tags of ``nonce``, as the model reads tool output.

    Inside, every occurrence of the nonce is replaced, invisible or line-breaking characters are escaped and chat
    control tokens broken up, so nothing in ``text`` can write the closing tag or a turn of its own: the fence ends
    only where this function ends it.
    """
    inner = text.replace(nonce, "[nonce]") if nonce else text
    inner = _INVISIBLE.sub(_escaped, inner).replace(_CONTROL_TOKEN, "< |")
    return f"{fence_open(nonce)}{inner}{fence_close(nonce)}"


def visible(text: str) -> str:
    """``text`` as a person reads it: line separators as spaces, the invisible characters ``fence`` escapes left out,
    so that a value copied into an answer carries no hidden text (Unicode tag characters spell ASCII unseen)."""
    return _INVISIBLE.sub(lambda m: " " if m.group() in _LINE_SEPARATORS else "", text)


def _escaped(match: re.Match[str]) -> str:
    """A character as JSON writes it escaped (a surrogate pair beyond U+FFFF), so fenced JSON stays JSON."""
    code = ord(match.group())
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


class Redactor:
    """Replaces secrets with ``replacement`` in text and in JSON values (keys and strings, at any depth):

    - matches of ``patterns`` (only the group named ``secret`` when a pattern has one);
    - every value under a dict key that one of ``keys`` finds (ignoring case), whatever it looks like;
    - each of ``canaries`` (secret values, e.g. of the environment) and its base64, anywhere in a string.

    A disabled redactor returns everything unchanged.
    """

    def __init__(
        self,
        patterns: Iterable[str] = (),
        canaries: Iterable[str] = (),
        *,
        keys: Iterable[str] = (),
        replacement: str = "[redacted]",
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.replacement = replacement
        self._patterns = [re.compile(pattern) for pattern in patterns]
        self._keys = [re.compile(pattern, re.IGNORECASE) for pattern in keys]
        literals = {form for canary in canaries if canary for form in _encodings(canary)}
        # Longest first, so that a canary containing another is replaced whole.
        ordered = sorted(literals, key=lambda s: (-len(s), s))
        self._canaries = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @classmethod
    def from_config(cls, config: GuardrailsConfig, canaries: Sequence[str] | None = None) -> Redactor:
        """The redactor ``config`` describes; ``canaries`` default to the values config.canary_values() reads from
        this process's environment (call it once, at start)."""
        return cls(
            config.redact_patterns,
            config.canary_values() if canaries is None else canaries,
            keys=config.redact_keys,
            replacement=config.replacement,
            enabled=config.enabled,
        )

    @classmethod
    def default(cls) -> Redactor:
        """The redactor of the default configuration over this process's environment."""
        return cls.from_config(GuardrailsConfig())

    def text(self, text: str) -> str:
        """``text`` with every secret replaced."""
        if not self.enabled or not text:
            return text
        if self._canaries is not None:
            text = self._canaries.sub(self.replacement, text)
        for pattern in self._patterns:
            text = pattern.sub(self._replace_match, text)
        return text

    def _replace_match(self, match: re.Match[str]) -> str:
        if "secret" in match.re.groupindex and match.group("secret") is not None:
            start, end = match.span("secret")
            offset = match.start()
            whole = match.group()
            return whole[: start - offset] + self.replacement + whole[end - offset :]
        return self.replacement

    def value(self, value: Any) -> Any:
        """A JSON value with secrets replaced in its strings and keys, at any depth; other scalars as they are."""
        if not self.enabled:
            return value
        return self._value(value, secret=False)

    def _value(self, value: Any, *, secret: bool) -> Any:
        if isinstance(value, dict):
            return {
                self.text(str(key)): self._value(item, secret=secret or self._secret_key(str(key)))
                for key, item in value.items()
            }
        if isinstance(value, list | tuple):
            return [self._value(item, secret=secret) for item in value]
        if secret and value is not None and not isinstance(value, bool):
            return self.replacement
        return self.text(value) if isinstance(value, str) else value

    def _secret_key(self, key: str) -> bool:
        return any(pattern.search(key) for pattern in self._keys)

    def outcome(self, outcome: ToolOutcome) -> ToolOutcome:
        """A tool's outcome with its result and error redacted: what the model, the journal and clients see."""
        if not self.enabled:
            return outcome
        error = None if outcome.error is None else self.text(outcome.error)
        return replace(outcome, result=self.value(outcome.result), error=error)

    def action(self, text: str) -> str:
        """The model's output redacted. JSON (the actions of every policy) is redacted value by value and written
        back only if something changed, so it stays JSON the policy can parse; other text as text."""
        if not self.enabled:
            return text
        try:
            parsed = json.loads(text)
        except ValueError:
            return self.text(text)
        redacted = self.value(parsed)
        if redacted == parsed:
            return text
        return json.dumps(redacted, ensure_ascii=False, separators=(", ", ": "))


def _encodings(canary: str) -> set[str]:
    """The canary and its base64 (standard and URL-safe, padding left off) as they would appear in text."""
    raw = canary.encode()
    forms = {canary}
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        forms.add(encoded.decode().rstrip("="))
    return forms
