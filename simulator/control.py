"""The control endpoint: ``/_control/<action>`` drives a running simulator over HTTP.

``POST`` actions take a JSON object and change faults or chats; ``GET`` actions read the record.
Answers use the Bot API envelope: ``{"ok": true, "result": ...}`` or ``{"ok": false,
"description": ...}`` (400 for bad arguments, 404 for an unknown action). Where an action takes
``bot``, it may be a bot id, a username or a token (``token`` is accepted as the key too).
Runs on the handler thread of the request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from simulator.envelope import JsonObject
from simulator.limits import Rate

if TYPE_CHECKING:
    from simulator.simulator import BotApiSimulator, BotRef

Action = Callable[["BotApiSimulator", JsonObject], object]


class ControlError(Exception):
    """A control request with a missing or invalid argument."""


class ControlEndpoint:
    """Dispatches control requests to a :class:`~simulator.simulator.BotApiSimulator`."""

    def __init__(self, simulator: BotApiSimulator) -> None:
        self._simulator = simulator

    def __call__(
        self, http_method: str, action: str, query: dict[str, str], body: JsonObject
    ) -> tuple[int, JsonObject]:
        table: dict[str, Action] = _POST_ACTIONS if http_method == "POST" else _GET_ACTIONS
        handler = table.get(action)
        if handler is None:
            return 404, {"ok": False, "description": f"no {http_method} control action {action!r}"}
        arguments = {**query, **body} if http_method == "GET" else body
        try:
            result = handler(self._simulator, arguments)
        except (ControlError, KeyError, ValueError, TypeError) as problem:
            return 400, {"ok": False, "description": _describe(problem)}
        return 200, {"ok": True, "result": result}


def _describe(problem: Exception) -> str:
    if isinstance(problem, KeyError):
        return str(problem.args[0]) if problem.args else "unknown bot"
    return str(problem)


def _required_bot(args: JsonObject) -> BotRef:
    ref = _bot(args)
    if ref is None:
        raise ControlError("this action needs 'bot' (a bot id, username or token)")
    return ref


def _bot(args: JsonObject) -> BotRef | None:
    ref = args.get("bot", args.get("token"))
    if ref is None:
        return None
    if isinstance(ref, str) and ref.lstrip("-").isdigit():
        return int(ref)
    if not isinstance(ref, int | str) or isinstance(ref, bool):
        raise ControlError("'bot' must be a bot id, a username or a token")
    return ref


def _number(args: JsonObject, name: str, default: float | None = None) -> float:
    value = args.get(name, default)
    if value is None:
        raise ControlError(f"this action needs {name!r}")
    if isinstance(value, bool):
        raise ControlError(f"{name!r} must be a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ControlError(f"{name!r} must be a number") from None


def _optional_int(args: JsonObject, name: str) -> int | None:
    value = args.get(name)
    return None if value is None else int(_number(args, name))


def _int(args: JsonObject, name: str) -> int:
    value = _number(args, name)
    if value != int(value):
        raise ControlError(f"{name!r} must be an integer")
    return int(value)


def _chat(args: JsonObject) -> int | str:
    chat = args.get("chat_id")
    if chat is None:
        raise ControlError("this action needs 'chat_id'")
    if not isinstance(chat, int | str) or isinstance(chat, bool):
        raise ControlError("'chat_id' must be an id or an @username")
    return chat


def _page(args: JsonObject, items: list[Any]) -> list[Any]:
    offset = int(_number(args, "offset", 0))
    limit = args.get("limit")
    return items[offset:] if limit is None else items[offset : offset + int(_number(args, "limit"))]


def _rate(value: object, name: str) -> Rate:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ControlError(f"{name!r} must be [count, period_seconds]")
    return Rate(int(value[0]), float(value[1]))


def _set_limits(sim: BotApiSimulator, args: JsonObject) -> object:
    if "enforce" in args:
        sim.enforce_limits = bool(args["enforce"])
    changes: dict[str, Any] = {
        name: _rate(args[name], name) for name in ("per_bot", "per_private_chat", "per_group") if name in args
    }
    if "tolerance_seconds" in args:
        changes["tolerance_seconds"] = _number(args, "tolerance_seconds")
    if changes:
        sim.set_limits(replace(sim.limits, **changes))
    return _limits_view(sim)


def _limits_view(sim: BotApiSimulator, args: JsonObject | None = None) -> object:
    limits = sim.limits
    return {
        "enforce": sim.enforce_limits,
        "per_bot": [limits.per_bot.count, limits.per_bot.period_seconds],
        "per_private_chat": [limits.per_private_chat.count, limits.per_private_chat.period_seconds],
        "per_group": [limits.per_group.count, limits.per_group.period_seconds],
        "tolerance_seconds": limits.tolerance_seconds,
    }


def _deliveries(sim: BotApiSimulator, args: JsonObject) -> object:
    bot = _bot(args)
    chat = args.get("chat_id")
    found = sim.record.deliveries(
        bot_id=None if bot is None else sim.bot(bot).id,
        chat_id=None if chat is None else int(chat),
    )
    return {
        "count": len(found),
        "deliveries": [delivery.to_json() for delivery in _page(args, found)],
        "duplicates": [duplicate.to_json() for duplicate in sim.record.duplicates()],
    }


def _duplicates(sim: BotApiSimulator, args: JsonObject) -> object:
    return [duplicate.to_json() for duplicate in sim.record.duplicates()]


def _calls(sim: BotApiSimulator, args: JsonObject) -> object:
    bot = _bot(args)
    found = sim.record.calls(bot_id=None if bot is None else sim.bot(bot).id, method=args.get("method"))
    return {"count": len(found), "calls": [call.to_json() for call in _page(args, found)]}


def _bots(sim: BotApiSimulator, args: JsonObject) -> object:
    return [{"id": bot.id, "username": bot.username, "revoked": sim.is_revoked(bot)} for bot in sim.bots]


def _done(change: Callable[[], None]) -> object:
    change()
    return True


_POST_ACTIONS: dict[str, Action] = {
    "latency": lambda sim, args: _done(
        lambda: sim.set_latency(_number(args, "ms"), _number(args, "jitter_ms", 0), _bot(args))
    ),
    "bad_gateway": lambda sim, args: _done(
        lambda: sim.set_bad_gateway_rate(_number(args, "rate"), _bot(args))
    ),
    "reset_connections": lambda sim, args: _done(
        lambda: sim.set_reset_rate(_number(args, "rate"), _bot(args))
    ),
    "partition": lambda sim, args: _done(lambda: sim.partition(_number(args, "seconds"), _bot(args))),
    "flood": lambda sim, args: _done(
        lambda: sim.flood(
            _required_bot(args),
            _number(args, "seconds"),
            _optional_int(args, "retry_after"),
        )
    ),
    "accept_then_timeout": lambda sim, args: _done(
        lambda: sim.set_accept_then_timeout(_number(args, "rate"), _number(args, "delay_seconds"), _bot(args))
    ),
    "revoke": lambda sim, args: _done(lambda: sim.revoke(_required_bot(args))),
    "unrevoke": lambda sim, args: _done(lambda: sim.unrevoke(_required_bot(args))),
    "block_chat": lambda sim, args: _done(lambda: sim.block_chat(_chat(args), _bot(args))),
    "unblock_chat": lambda sim, args: _done(lambda: sim.unblock_chat(_chat(args), _bot(args))),
    "missing_chat": lambda sim, args: _done(lambda: sim.add_missing_chat(_chat(args))),
    "found_chat": lambda sim, args: _done(lambda: sim.remove_missing_chat(_chat(args))),
    "migrate_group": lambda sim, args: _done(
        lambda: sim.migrate_group(_int(args, "group_id"), _int(args, "supergroup_id"))
    ),
    "limits": _set_limits,
    "clear_faults": lambda sim, args: _done(sim.clear_faults),
    "reset": lambda sim, args: _done(sim.reset),
}

_GET_ACTIONS: dict[str, Action] = {
    "deliveries": _deliveries,
    "duplicates": _duplicates,
    "calls": _calls,
    "stats": lambda sim, args: sim.statistics(),
    "faults": lambda sim, args: sim.faults_snapshot(),
    "chats": lambda sim, args: sim.chats_snapshot(),
    "limits": _limits_view,
    "bots": _bots,
}
