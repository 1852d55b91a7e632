"""Simulated bots and their Telegram-shaped tokens.

A token looks like Telegram's: ``<bot id digits>:<35 characters of [A-Za-z0-9_-]>``. The secret
half never leaves this module in a log or a ``repr``; everything else names a bot by its id.
Pure functions and frozen values: safe to use from any thread.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field

TOKEN_PATTERN = re.compile(r"(\d{1,20}):([A-Za-z0-9_-]{35})")
SECRET_LENGTH = 35

_NATO = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
    "juliett", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
    "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu",
)  # fmt: skip


def make_token(bot_id: int) -> str:
    """A valid-shaped fake token for ``bot_id``; the same id always gives the same token."""
    if bot_id <= 0:
        raise ValueError("a bot id is a positive integer")
    digest = hashlib.sha256(f"tgrelay-simulator:{bot_id}".encode()).digest()
    secret = "AA" + base64.urlsafe_b64encode(digest).decode("ascii")[: SECRET_LENGTH - 2]
    return f"{bot_id}:{secret}"


def bot_id_of(token: str) -> int:
    """The bot id half of a well-formed token; ``ValueError`` if the token is malformed."""
    match = TOKEN_PATTERN.fullmatch(token)
    if match is None:
        raise ValueError("malformed bot token")
    return int(match.group(1))


def redact(token: str) -> str:
    """What logs may show of a token: its bot id only."""
    match = TOKEN_PATTERN.fullmatch(token)
    return f"{match.group(1)}:***" if match else "<malformed token>"


@dataclass(frozen=True)
class SimBot:
    """One bot the simulator knows.

    ``blocked_by`` holds the chats (ids or ``@usernames``) that blocked or kicked this bot;
    ``revoked`` starts the bot with its token already revoked (401 on every call).
    """

    token: str = field(repr=False)
    username: str
    first_name: str = ""
    blocked_by: frozenset[int | str] = frozenset()
    revoked: bool = False

    def __post_init__(self) -> None:
        bot_id_of(self.token)
        if not self.first_name:
            object.__setattr__(self, "first_name", _first_name_of(self.username))
        object.__setattr__(self, "blocked_by", frozenset(self.blocked_by))

    @property
    def id(self) -> int:
        return bot_id_of(self.token)

    def user_object(self) -> dict[str, object]:
        """The Telegram ``User`` object describing this bot in a message's ``from``."""
        return {
            "id": self.id,
            "is_bot": True,
            "first_name": self.first_name,
            "username": self.username,
        }

    def get_me_object(self) -> dict[str, object]:
        """What ``getMe`` answers for this bot."""
        return {
            **self.user_object(),
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }


def make_bots(count: int, first_id: int = 7_000_000_001) -> list[SimBot]:
    """``count`` bots named ``alpha_bot``, ``bravo_bot``, ... with ids from ``first_id``."""
    bots = []
    for index in range(count):
        name = _NATO[index % len(_NATO)]
        if index >= len(_NATO):
            name = f"{name}{index // len(_NATO) + 1}"
        bots.append(SimBot(token=make_token(first_id + index), username=f"{name}_bot"))
    return bots


def _first_name_of(username: str) -> str:
    stem = username.removesuffix("_bot").removesuffix("bot").replace("_", " ").strip()
    return stem.title() or username
