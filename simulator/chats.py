"""The simulated chats: what a ``chat_id`` names, who may write there, and message ids.

Telegram's id scheme decides the chat type: a positive id is a private chat with a user, an id
at or below ``-1000000000000`` (``-100...``) a supergroup, any other negative id a basic group,
and ``@username`` a public channel (given a stable ``-100...`` id on first use). Handler threads
call :meth:`ChatDirectory.resolve`, :meth:`ChatDirectory.check_can_write` and
:meth:`ChatDirectory.next_message_id`; control callers change the configuration. One lock.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from simulator.envelope import ApiError, JsonObject, bad_request, forbidden

SUPERGROUP_ID_CEILING = -1_000_000_000_000
_USERNAME = re.compile(r"@([A-Za-z][A-Za-z0-9_]{3,31})")
_INTEGER = re.compile(r"-?\d{1,20}")

ChatRef = int | str


class ChatType(StrEnum):
    PRIVATE = "private"
    GROUP = "group"
    SUPERGROUP = "supergroup"
    CHANNEL = "channel"


@dataclass(frozen=True, slots=True)
class Chat:
    id: int
    type: ChatType
    username: str | None = None

    @property
    def is_group(self) -> bool:
        """Groups, supergroups and channels share Telegram's per-group limit."""
        return self.type is not ChatType.PRIVATE

    def to_json(self) -> JsonObject:
        """The Telegram ``Chat`` object."""
        if self.type is ChatType.PRIVATE:
            return {"id": self.id, "first_name": f"User {self.id}", "type": "private"}
        body: JsonObject = {"id": self.id, "title": self._title(), "type": str(self.type)}
        if self.username:
            body["username"] = self.username
        return body

    def _title(self) -> str:
        if self.username:
            return self.username
        return f"{self.type.value.title()} {abs(self.id)}"


def parse_chat_ref(raw: object) -> ChatRef:
    """A ``chat_id`` parameter as Telegram reads it; raises the ``ApiError`` Telegram would."""
    if raw is None or raw == "":
        raise bad_request("chat_id is empty")
    if isinstance(raw, bool):
        raise bad_request("chat not found")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):
        text = raw.strip()
        if _INTEGER.fullmatch(text):
            return int(text)
        if _USERNAME.fullmatch(text):
            return text.lower()
    raise bad_request("chat not found")


def channel_id_for(username: str) -> int:
    """The stable ``-100...`` id the simulator gives the public chat ``@username``."""
    digest = hashlib.sha256(username.lower().encode()).digest()
    return SUPERGROUP_ID_CEILING - int.from_bytes(digest[:5], "big") % 9_000_000_000 - 1


class ChatDirectory:
    """Chat configuration (missing, blocked, migrated) and per-chat message id counters."""

    def __init__(
        self,
        missing: Iterable[object] = (),
        blocked: Iterable[object] = (),
        blocked_per_bot: Mapping[int, Iterable[object]] | None = None,
        migrated: Mapping[int, int] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._initial = (
            tuple(missing),
            tuple(blocked),
            {bot: tuple(chats) for bot, chats in (blocked_per_bot or {}).items()},
            dict(migrated or {}),
        )
        self._channels: dict[int, str] = {}
        self._missing: set[int] = set()
        self._blocked: set[tuple[int | None, int]] = set()
        self._migrated: dict[int, int] = {}
        self._last_message_id: dict[int, int] = {}
        self.reset()

    def reset(self) -> None:
        """Back to the constructor's configuration; message ids restart at 1."""
        missing, blocked, blocked_per_bot, migrated = self._initial
        with self._lock:
            self._missing.clear()
            self._blocked.clear()
            self._migrated = dict(migrated)
            self._last_message_id.clear()
        for ref in missing:
            self.add_missing(ref)
        for ref in blocked:
            self.block(ref)
        for bot_id, refs in blocked_per_bot.items():
            for ref in refs:
                self.block(ref, bot_id)

    def resolve(self, ref: ChatRef) -> Chat:
        """The chat ``ref`` names; usernames get their stable channel id."""
        if isinstance(ref, str):
            chat_id = channel_id_for(ref.removeprefix("@"))
            with self._lock:
                self._channels[chat_id] = ref.removeprefix("@")
            return Chat(chat_id, ChatType.CHANNEL, ref.removeprefix("@"))
        if ref > 0:
            return Chat(ref, ChatType.PRIVATE)
        if ref > SUPERGROUP_ID_CEILING:
            return Chat(ref, ChatType.GROUP)
        with self._lock:
            username = self._channels.get(ref)
        if username is not None:
            return Chat(ref, ChatType.CHANNEL, username)
        return Chat(ref, ChatType.SUPERGROUP)

    def check_can_write(self, bot_id: int, chat: Chat) -> None:
        """Raise what Telegram answers when ``bot_id`` cannot write to ``chat``."""
        with self._lock:
            missing = chat.id in self._missing or chat.id == 0
            migrate_to = self._migrated.get(chat.id)
            blocked = (None, chat.id) in self._blocked or (bot_id, chat.id) in self._blocked
        if missing:
            raise bad_request("chat not found")
        if migrate_to is not None:
            raise bad_request(
                "group chat was upgraded to a supergroup chat", {"migrate_to_chat_id": migrate_to}
            )
        if blocked:
            raise forbidden(_BLOCKED_REASONS[chat.type])

    def next_message_id(self, chat_id: int) -> int:
        with self._lock:
            message_id = self._last_message_id.get(chat_id, 0) + 1
            self._last_message_id[chat_id] = message_id
        return message_id

    def add_missing(self, ref: object) -> None:
        """Sends to ``ref`` (an id or ``@username``) get 400 chat not found."""
        chat_id = self._chat_id_of(ref)
        with self._lock:
            self._missing.add(chat_id)

    def remove_missing(self, ref: object) -> None:
        chat_id = self._chat_id_of(ref)
        with self._lock:
            self._missing.discard(chat_id)

    def block(self, ref: object, bot_id: int | None = None) -> None:
        """``ref`` blocks (or kicked) ``bot_id``, or every bot when ``bot_id`` is ``None``."""
        chat_id = self._chat_id_of(ref)
        with self._lock:
            self._blocked.add((bot_id, chat_id))

    def unblock(self, ref: object, bot_id: int | None = None) -> None:
        chat_id = self._chat_id_of(ref)
        with self._lock:
            self._blocked.discard((bot_id, chat_id))

    def migrate(self, group_id: int, supergroup_id: int) -> None:
        """The basic group ``group_id`` became the supergroup ``supergroup_id``."""
        if not SUPERGROUP_ID_CEILING < group_id < 0:
            raise ValueError("only a basic group (a negative id above -1000000000000) migrates")
        if supergroup_id > SUPERGROUP_ID_CEILING:
            raise ValueError("a supergroup id is -1000000000000 or below")
        with self._lock:
            self._migrated[group_id] = supergroup_id

    def _chat_id_of(self, ref: object) -> int:
        try:
            return self.resolve(parse_chat_ref(ref)).id
        except ApiError:
            raise ValueError(f"{ref!r} is not a chat id or @username") from None

    def snapshot(self) -> JsonObject:
        with self._lock:
            return {
                "missing": sorted(self._missing),
                "blocked": [
                    {"bot_id": bot_id, "chat_id": chat_id}
                    for bot_id, chat_id in sorted(self._blocked, key=str)
                ],
                "migrated": {str(group): to for group, to in self._migrated.items()},
            }


_BLOCKED_REASONS = {
    ChatType.PRIVATE: "bot was blocked by the user",
    ChatType.GROUP: "bot was kicked from the group chat",
    ChatType.SUPERGROUP: "bot was kicked from the supergroup chat",
    ChatType.CHANNEL: "bot is not a member of the channel chat",
}
