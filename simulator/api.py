"""The Bot API itself: authentication, ``getMe`` and ``sendMessage``.

Knows nothing of HTTP or injected network faults (``simulator.server`` applies those first);
it turns a token, a method name and parameters into Telegram's answer and records deliveries.
Handler threads call :meth:`BotApi.call` concurrently; the parts it uses are thread-safe.

The checks of ``sendMessage`` run in the Telegram Bot API server's order: the text, then the
chat (empty id, not found, migrated, blocked), then the length, then the rate limits. Only a
send that would appear in the chat consumes rate budget.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from simulator.bots import SimBot
from simulator.chats import Chat, ChatDirectory, ChatRef, ChatType, parse_chat_ref
from simulator.envelope import (
    ApiError,
    JsonObject,
    bad_request,
    not_found,
    ok_envelope,
    too_many_requests,
    unauthorized,
)
from simulator.faults import Faults
from simulator.limits import RateLimiter
from simulator.record import Delivery, Record

MAX_TEXT_LENGTH = 4096
PARSE_MODES = frozenset({"html", "markdown", "markdownv2"})


@dataclass(frozen=True, slots=True)
class ApiOutcome:
    """Telegram's answer to one call, plus what the record and the server need to know."""

    status: int
    body: JsonObject
    chat_ref: ChatRef | None = None
    retry_after: int | None = None
    answer_delay: float = 0.0


class BotApi:
    """The simulated Bot API for a set of bots."""

    def __init__(
        self,
        bots: Iterable[SimBot],
        chats: ChatDirectory,
        limiter: RateLimiter,
        faults: Faults,
        record: Record,
        enforce_limits: bool = True,
    ) -> None:
        self._chats = chats
        self._limiter = limiter
        self._faults = faults
        self._record = record
        self.enforce_limits = enforce_limits
        self._lock = threading.Lock()
        self._by_token: dict[str, SimBot] = {}
        self._by_id: dict[int, SimBot] = {}
        for bot in bots:
            self.add_bot(bot)

    def add_bot(self, bot: SimBot) -> None:
        """Register ``bot`` (its ``blocked_by`` chats and its revocation with it)."""
        with self._lock:
            if bot.id in self._by_id:
                raise ValueError(f"a bot with id {bot.id} is already registered")
            self._by_token[bot.token] = bot
            self._by_id[bot.id] = bot
        for chat in bot.blocked_by:
            self._chats.block(chat, bot.id)
        if bot.revoked:
            self._faults.revoke(bot.id)

    @property
    def bots(self) -> list[SimBot]:
        with self._lock:
            return list(self._by_id.values())

    def bot_by_id(self, bot_id: int) -> SimBot | None:
        return self._by_id.get(bot_id)

    def bot_by_token(self, token: str) -> SimBot | None:
        return self._by_token.get(token)

    def call(
        self, token: str, method: str, params: JsonObject, flood_retry_after: int | None = None
    ) -> ApiOutcome:
        """Answer ``method`` called with a well-formed ``token``.

        ``flood_retry_after`` is set while a 429 storm rages on this token: a known, valid
        token then gets nothing but 429s.
        """
        chat_ref = _chat_ref_or_none(params.get("chat_id"))
        try:
            bot = self._by_token.get(token)
            if bot is None or self._faults.is_revoked(bot.id):
                raise unauthorized()
            handler = _METHODS.get(method.lower())
            if handler is None:
                raise not_found()
            if flood_retry_after is not None:
                raise too_many_requests(flood_retry_after)
            return handler(self, bot, params)
        except ApiError as error:
            retry_after = (error.parameters or {}).get("retry_after")
            return ApiOutcome(error.error_code, error.envelope(), chat_ref, retry_after)

    def _get_me(self, bot: SimBot, params: JsonObject) -> ApiOutcome:
        return ApiOutcome(200, ok_envelope(bot.get_me_object()))

    def _send_message(self, bot: SimBot, params: JsonObject) -> ApiOutcome:
        text = _text_of(params.get("text"))
        _check_parse_mode(params.get("parse_mode"))
        chat_ref = parse_chat_ref(params.get("chat_id"))
        chat = self._chats.resolve(chat_ref)
        self._chats.check_can_write(bot.id, chat)
        if len(text.strip()) > MAX_TEXT_LENGTH:
            raise bad_request("message is too long")
        if self.enforce_limits:
            retry_after = self._limiter.acquire(bot.id, chat.id, chat.is_group)
            if retry_after is not None:
                raise too_many_requests(retry_after)
        return self._deliver(bot, chat, chat_ref, text)

    def _deliver(self, bot: SimBot, chat: Chat, chat_ref: ChatRef, text: str) -> ApiOutcome:
        message_id = self._chats.next_message_id(chat.id)
        answer_delay = self._faults.answer_delay(bot.id)
        now = time.time()
        self._record.add_delivery(
            Delivery(
                bot_id=bot.id,
                bot_username=bot.username,
                chat_id=chat.id,
                chat_ref=chat_ref,
                text=text,
                message_id=message_id,
                timestamp=now,
                monotonic=time.monotonic(),
                answer_delayed=answer_delay > 0,
            )
        )
        message: JsonObject = {"message_id": message_id}
        if chat.type is ChatType.CHANNEL:
            message["sender_chat"] = chat.to_json()
        else:
            message["from"] = bot.user_object()
        message.update({"chat": chat.to_json(), "date": int(now), "text": text.strip()})
        return ApiOutcome(200, ok_envelope(message), chat_ref, None, answer_delay)


_METHODS = {"getme": BotApi._get_me, "sendmessage": BotApi._send_message}


def _text_of(raw: object) -> str:
    """Telegram trims the text; nothing left means an empty message."""
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise bad_request("message text is empty")
    text = str(raw)
    if not text.strip():
        raise bad_request("message text is empty")
    return text


def _check_parse_mode(raw: object) -> None:
    if raw in (None, ""):
        return
    if not isinstance(raw, str) or raw.lower() not in PARSE_MODES:
        raise bad_request("unsupported parse_mode")


def _chat_ref_or_none(raw: object) -> ChatRef | None:
    try:
        return parse_chat_ref(raw)
    except ApiError:
        return None
