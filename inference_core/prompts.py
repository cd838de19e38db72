"""A request's prompt or chat as token ids, the same way for every in-process backend."""

from __future__ import annotations

from typing import Any

from inference_core.errors import InvalidRequestError

VALID_ROLES = ("system", "user", "assistant", "tool")


def encode_prompt(
    tokenizer: Any, model_id: str, prompt: str | None, messages: list[dict[str, str]] | None
) -> list[int]:
    """Token ids of a raw prompt (special tokens added as the tokenizer does) or of a chat rendered with the model's
    chat template, generation prompt added. Raises InvalidRequestError saying what to change."""
    if (prompt is None) == (messages is None):
        raise InvalidRequestError("send exactly one of prompt or messages")
    if prompt is not None:
        if not prompt:
            raise InvalidRequestError("prompt is empty; send some text")
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not messages:
        raise InvalidRequestError("messages is empty; send at least one message")
    for i, message in enumerate(messages):
        if message.get("role") not in VALID_ROLES:
            raise InvalidRequestError(
                f"message {i} has role {message.get('role')!r}; use one of {', '.join(VALID_ROLES)}"
            )
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(f"model {model_id} has no chat template; send a raw prompt instead")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja errors from the template, e.g. roles it does not accept
        raise InvalidRequestError(f"the chat template of {model_id} rejected the messages: {e}") from e
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
