"""``BotApiSimulator``: the in-process face of the simulator.

Owns the parts (bots, chats, limits, faults, record), the HTTP server and the thread that runs
``serve_forever``. Its methods are safe to call from any thread while the server runs; each
change applies to requests that arrive after it.

``bot`` arguments accept a bot id, a username (with or without ``@``), a token or a
:class:`~simulator.bots.SimBot`; the bot must be registered.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from types import TracebackType

from simulator.api import BotApi
from simulator.bots import TOKEN_PATTERN, SimBot
from simulator.chats import ChatDirectory, ChatRef
from simulator.control import ControlEndpoint
from simulator.faults import Faults, FaultSet
from simulator.limits import Limits, RateLimiter
from simulator.record import Record
from simulator.server import SimulatorHttpServer

logger = logging.getLogger("simulator")

BotRef = int | str | SimBot


class BotApiSimulator:
    """A Telegram Bot API simulator listening on ``host:port`` (``port=0``: any free port)."""

    def __init__(
        self,
        bots: Iterable[SimBot] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        enforce_limits: bool = True,
        limits: Limits | None = None,
        faults: FaultSet | None = None,
        missing_chats: Iterable[ChatRef] = (),
        blocked_chats: Iterable[ChatRef] = (),
        migrated_groups: Mapping[int, int] | None = None,
        seed: int | None = None,
    ) -> None:
        self.record = Record()
        self._chats = ChatDirectory(
            missing=missing_chats,
            blocked=blocked_chats,
            migrated=migrated_groups,
        )
        self._limiter = RateLimiter(limits or Limits())
        self._faults = Faults(initial=faults, seed=seed)
        self._api = BotApi(bots, self._chats, self._limiter, self._faults, self.record, enforce_limits)
        self._host = host
        self._requested_port = port
        self._server: SimulatorHttpServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> BotApiSimulator:
        """Bind and serve on a background daemon thread; returns ``self``."""
        if self._server is not None:
            raise RuntimeError("the simulator is already running")
        self._server = SimulatorHttpServer(
            (self._host, self._requested_port),
            self._api,
            self._faults,
            self.record,
            ControlEndpoint(self),
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name=f"bot-api-simulator:{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.info("simulator: listening on %s with bots %s", self.url, self.bot_ids)
        return self

    def stop(self) -> None:
        """Stop serving and cut open connections; idempotent."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        server.stop()
        thread.join(timeout=5)
        logger.info("simulator: stopped")

    def __enter__(self) -> BotApiSimulator:
        if self._server is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the simulator is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://host:port``: what ``[telegram] api_base_url`` should be."""
        return f"http://{self._host}:{self.port}"

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted since :meth:`start`: keep-alive clients reuse one."""
        if self._server is None:
            raise RuntimeError("the simulator is not running")
        return self._server.connections_accepted

    # -- bots --------------------------------------------------------------------------------

    @property
    def bots(self) -> list[SimBot]:
        return self._api.bots

    @property
    def bot_ids(self) -> list[int]:
        return [bot.id for bot in self._api.bots]

    def add_bot(self, bot: SimBot) -> None:
        self._api.add_bot(bot)

    def bot(self, ref: BotRef) -> SimBot:
        """The registered bot ``ref`` names; ``KeyError`` if there is none."""
        if isinstance(ref, SimBot):
            ref = ref.id
        found: SimBot | None = None
        if isinstance(ref, int) and not isinstance(ref, bool):
            found = self._api.bot_by_id(ref)
        elif isinstance(ref, str) and TOKEN_PATTERN.fullmatch(ref):
            found = self._api.bot_by_token(ref)
        elif isinstance(ref, str):
            wanted = ref.removeprefix("@").lower()
            found = next((b for b in self._api.bots if b.username.lower() == wanted), None)
        if found is None:
            raise KeyError("no such bot registered in the simulator")
        return found

    # -- limits ------------------------------------------------------------------------------

    @property
    def enforce_limits(self) -> bool:
        return self._api.enforce_limits

    @enforce_limits.setter
    def enforce_limits(self, enforce: bool) -> None:
        self._api.enforce_limits = enforce

    @property
    def limits(self) -> Limits:
        return self._limiter.limits

    def set_limits(self, limits: Limits) -> None:
        """Replace the limits; every bot and chat starts with a fresh budget."""
        self._limiter.set_limits(limits)

    # -- faults ------------------------------------------------------------------------------

    def set_latency(self, ms: float, jitter_ms: float = 0.0, bot: BotRef | None = None) -> None:
        """Add ``ms`` (plus up to ``jitter_ms``, uniform) before every answer."""
        self._faults.update(self._scope(bot), latency_ms=ms, jitter_ms=jitter_ms)

    def set_bad_gateway_rate(self, rate: float, bot: BotRef | None = None) -> None:
        """Answer that fraction of requests with nginx's HTML 502 page."""
        self._faults.update(self._scope(bot), bad_gateway_rate=rate)

    def set_reset_rate(self, rate: float, bot: BotRef | None = None) -> None:
        """Reset (TCP RST, no answer) that fraction of requests."""
        self._faults.update(self._scope(bot), reset_rate=rate)

    def partition(self, seconds: float, bot: BotRef | None = None) -> None:
        """Reset every request for ``seconds`` from now (``0`` heals a partition)."""
        deadline = self._faults.seconds_from_now(seconds) if seconds > 0 else 0.0
        self._faults.update(self._scope(bot), partition_until=deadline)

    def flood(self, bot: BotRef, seconds: float, retry_after: int | None = None) -> None:
        """A 429 storm: every call with ``bot``'s token gets 429 for ``seconds`` from now.

        ``retry_after`` defaults to the whole seconds left in the storm.
        """
        deadline = self._faults.seconds_from_now(seconds) if seconds > 0 else 0.0
        self._faults.update(self._scope(bot), flood_until=deadline, flood_retry_after=retry_after)

    def set_accept_then_timeout(self, rate: float, delay_seconds: float, bot: BotRef | None = None) -> None:
        """Deliver that fraction of sends but hold their answer back for ``delay_seconds``."""
        self._faults.update(
            self._scope(bot),
            accept_then_timeout_rate=rate,
            accept_then_timeout_seconds=delay_seconds,
        )

    def revoke(self, bot: BotRef) -> None:
        """From now on every call with ``bot``'s token (getMe too) gets 401 Unauthorized."""
        bot_id = self.bot(bot).id
        self._faults.revoke(bot_id)
        logger.info("simulator: bot %s revoked", bot_id)

    def unrevoke(self, bot: BotRef) -> None:
        bot_id = self.bot(bot).id
        self._faults.unrevoke(bot_id)
        logger.info("simulator: bot %s unrevoked", bot_id)

    def is_revoked(self, bot: BotRef) -> bool:
        return self._faults.is_revoked(self.bot(bot).id)

    def clear_faults(self) -> None:
        """Back to the constructor's faults; only bots created ``revoked`` stay revoked."""
        self._faults.clear()
        for bot in self._api.bots:
            if bot.revoked:
                self._faults.revoke(bot.id)

    def faults_snapshot(self) -> dict[str, object]:
        return self._faults.snapshot()

    # -- chats -------------------------------------------------------------------------------

    def block_chat(self, chat: ChatRef, bot: BotRef | None = None) -> None:
        """``chat`` blocks (or kicks) ``bot``, or every bot: sends get 403."""
        self._chats.block(chat, self._scope(bot))

    def unblock_chat(self, chat: ChatRef, bot: BotRef | None = None) -> None:
        self._chats.unblock(chat, self._scope(bot))

    def add_missing_chat(self, chat: ChatRef) -> None:
        """Sends to ``chat`` get 400 chat not found."""
        self._chats.add_missing(chat)

    def remove_missing_chat(self, chat: ChatRef) -> None:
        self._chats.remove_missing(chat)

    def migrate_group(self, group_id: int, supergroup_id: int) -> None:
        """Sends to the group get 400 with ``parameters.migrate_to_chat_id = supergroup_id``."""
        self._chats.migrate(group_id, supergroup_id)

    def chats_snapshot(self) -> dict[str, object]:
        return self._chats.snapshot()

    # -- everything --------------------------------------------------------------------------

    def reset(self) -> None:
        """Clear faults, the record, rate budgets and chat changes made since construction."""
        self.clear_faults()
        self.record.clear()
        self._limiter.clear()
        self._chats.reset()
        for bot in self._api.bots:
            for chat in bot.blocked_by:
                self._chats.block(chat, bot.id)
        logger.info("simulator: reset")

    def statistics(self) -> dict[str, object]:
        """The record's statistics, connections accepted and the current faults."""
        connections = self._server.connections_accepted if self._server else 0
        return {
            **self.record.statistics(),
            "connections_accepted": connections,
            "faults": self._faults.snapshot(),
        }

    def _scope(self, bot: BotRef | None) -> int | None:
        return None if bot is None else self.bot(bot).id
