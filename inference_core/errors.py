"""Engine errors; messages are shown to clients, so each says what to change."""


class EngineError(Exception):
    """Base of every error an engine raises on purpose."""


class InvalidRequestError(EngineError):
    """The request cannot be served as sent (too long a prompt, bad sampling values, invalid schema/regex/grammar)."""


class QueueFullError(EngineError):
    """The admission queue is full; the request was not accepted and can be retried later."""


class EngineClosedError(EngineError):
    """The engine is not running (not started yet, shut down, or its loop failed)."""
