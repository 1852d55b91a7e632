"""One error hierarchy for tgrelay, rooted in :class:`TgrelayError`.

Callers catch :class:`TgrelayError` to handle anything tgrelay raises on purpose; every
subclass carries a message that is safe to show a user (no token secret ever appears in one).
"""

from __future__ import annotations


class TgrelayError(Exception):
    """Base class of every error tgrelay raises on purpose."""


class ConfigError(TgrelayError):
    """The configuration is invalid: ``key`` names the offending setting."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


class InvalidMessage(TgrelayError):
    """A message handed to the relay is malformed; nothing was stored."""


class UnknownPool(InvalidMessage):
    """The message names a pool that the configuration does not define."""


class DedupConflict(TgrelayError):
    """The same ``dedup_key`` was reused for a different payload (a client bug)."""

    def __init__(self, dedup_key: str, original_id: int) -> None:
        super().__init__(
            f"dedup_key {dedup_key!r} was already used for a different message "
            f"(id {original_id}); use a new key for a new message"
        )
        self.dedup_key = dedup_key
        self.original_id = original_id


class StoreUnavailable(TgrelayError):
    """The store could not durably commit (disk full, locked, corrupt, stopped).

    Nothing the caller handed over was accepted when this is raised.
    """


class MessageNotFound(TgrelayError):
    """No message with that id exists (or it has been archived)."""
