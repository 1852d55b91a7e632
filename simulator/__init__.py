"""A faithful Telegram Bot API simulator for tests, the demo and benchmarks.

``BotApiSimulator`` serves ``/bot<token>/getMe`` and ``/bot<token>/sendMessage`` over a real
loopback socket with Telegram's envelopes, errors and rate limits, injects network faults on
demand and records every call and delivery. ``simulator.cli.main`` runs it standalone.
"""

from simulator.bots import SimBot, bot_id_of, make_bots, make_token, redact
from simulator.chats import ChatType, channel_id_for
from simulator.faults import FaultSet
from simulator.limits import Limits, Rate
from simulator.record import Call, Delivery, Duplicate, Record
from simulator.server import BAD_GATEWAY_PAGE
from simulator.simulator import BotApiSimulator, BotRef

__all__ = [
    "BAD_GATEWAY_PAGE",
    "BotApiSimulator",
    "BotRef",
    "Call",
    "ChatType",
    "Delivery",
    "Duplicate",
    "FaultSet",
    "Limits",
    "Rate",
    "Record",
    "SimBot",
    "bot_id_of",
    "channel_id_for",
    "make_bots",
    "make_token",
    "redact",
]
