"""python-telegram-bot, a real Bot API client, accepts the simulator as Telegram."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta

import pytest
import telegram
from telegram.error import BadRequest, ChatMigrated, Forbidden, InvalidToken, NetworkError, RetryAfter

from simulator import BotApiSimulator, SimBot, make_bots, make_token

# PTB 22 warns that RetryAfter.retry_after will become a timedelta; `seconds` reads both.
pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")

BOTS = make_bots(2)
ALPHA, BRAVO = BOTS


@pytest.fixture
def sim() -> Iterator[BotApiSimulator]:
    with BotApiSimulator(bots=BOTS, blocked_chats=[666], migrated_groups={-42: -1009876543210}) as simulator:
        yield simulator


def ptb_bot(sim: BotApiSimulator, bot: SimBot = ALPHA) -> telegram.Bot:
    return telegram.Bot(bot.token, base_url=sim.url + "/bot")


def seconds(retry_after: int | timedelta) -> float:
    return retry_after.total_seconds() if isinstance(retry_after, timedelta) else retry_after


def test_get_me_returns_the_bot_user(sim: BotApiSimulator) -> None:
    async def scenario() -> telegram.User:
        async with ptb_bot(sim) as bot:
            return await bot.get_me()

    me = asyncio.run(scenario())

    assert me.id == ALPHA.id
    assert me.username == "alpha_bot"
    assert me.is_bot


def test_send_message_returns_a_parsed_message(sim: BotApiSimulator) -> None:
    async def scenario() -> list[telegram.Message]:
        async with ptb_bot(sim) as bot:
            return [
                await bot.send_message(chat_id=42, text="hello"),
                await bot.send_message(chat_id=-1001234567890, text="to the group"),
                await bot.send_message(chat_id="@news_channel", text="to the channel"),
            ]

    private, group, channel = asyncio.run(scenario())

    assert (private.message_id, private.text, private.chat.type) == (1, "hello", "private")
    assert private.from_user is not None
    assert private.from_user.id == ALPHA.id
    assert group.chat.type == "supergroup"
    assert channel.chat.type == "channel"
    assert channel.sender_chat == channel.chat
    assert [d.text for d in sim.record.deliveries()] == ["hello", "to the group", "to the channel"]


def test_rate_limit_raises_retry_after(sim: BotApiSimulator) -> None:
    async def scenario() -> None:
        async with ptb_bot(sim) as bot:
            await bot.send_message(chat_id=42, text="first")
            await bot.send_message(chat_id=42, text="too soon")

    with pytest.raises(RetryAfter) as raised:
        asyncio.run(scenario())

    assert seconds(raised.value.retry_after) == 1


def test_flood_raises_retry_after_with_its_duration(sim: BotApiSimulator) -> None:
    sim.flood(ALPHA, seconds=30, retry_after=12)

    async def scenario() -> None:
        async with ptb_bot(sim) as bot:
            await bot.send_message(chat_id=42, text="storm")

    with pytest.raises(RetryAfter) as raised:
        asyncio.run(scenario())

    assert seconds(raised.value.retry_after) == 12


def test_blocked_chat_raises_forbidden(sim: BotApiSimulator) -> None:
    async def scenario() -> None:
        async with ptb_bot(sim) as bot:
            await bot.send_message(chat_id=666, text="hello?")

    with pytest.raises(Forbidden, match="bot was blocked by the user"):
        asyncio.run(scenario())


def test_migrated_group_raises_chat_migrated(sim: BotApiSimulator) -> None:
    async def scenario() -> None:
        async with ptb_bot(sim) as bot:
            await bot.send_message(chat_id=-42, text="hello group")

    with pytest.raises(ChatMigrated) as raised:
        asyncio.run(scenario())

    assert raised.value.new_chat_id == -1009876543210


def test_too_long_text_raises_bad_request(sim: BotApiSimulator) -> None:
    async def scenario() -> None:
        async with ptb_bot(sim) as bot:
            await bot.send_message(chat_id=42, text="x" * 4097)

    with pytest.raises(BadRequest, match=r"(?i)message is too long"):
        asyncio.run(scenario())


def test_unknown_token_raises_invalid_token(sim: BotApiSimulator) -> None:
    stranger = SimBot(token=make_token(31337), username="stranger_bot")

    async def scenario() -> None:
        async with ptb_bot(sim, stranger) as bot:
            await bot.get_me()

    with pytest.raises(InvalidToken):
        asyncio.run(scenario())


def test_revoked_token_raises_invalid_token_on_send(sim: BotApiSimulator) -> None:
    async def scenario() -> None:
        async with ptb_bot(sim, BRAVO) as bot:
            sim.revoke(BRAVO)
            await bot.send_message(chat_id=42, text="after revocation")

    with pytest.raises(InvalidToken, match="Unauthorized"):
        asyncio.run(scenario())


def test_bad_gateway_page_raises_network_error(sim: BotApiSimulator) -> None:
    async def scenario() -> None:
        async with ptb_bot(sim) as bot:
            sim.set_bad_gateway_rate(1.0)
            await bot.send_message(chat_id=42, text="through a broken proxy")

    with pytest.raises(NetworkError, match="Bad Gateway"):
        asyncio.run(scenario())
