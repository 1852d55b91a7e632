"""``tgrelay demo`` and ``tgrelay tokens validate``, run as the command line runs them."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from simulator import BotApiSimulator, make_bots
from supervision.cli import main
from supervision.demo import run_demo


@pytest.mark.slow
def test_the_demo_delivers_every_message_or_fails_it_with_a_reason_and_exits_zero() -> None:
    out = io.StringIO()

    code = run_demo(argparse.Namespace(messages=300), out=out)

    report = out.getvalue()
    assert code == 0, report
    assert "429 storm on bravo" in report
    assert "token delta revoked" in report
    assert "unfinished             0" in report
    assert "duplicates 0" in report
    assert "Bad Request: chat not found" in report
    assert "refused by every token of the pool" in report
    for name in ("alpha", "bravo", "charlie", "delta"):
        assert f"  {name} " in report


def write_config(path: Path, sim: BotApiSimulator) -> Path:
    tokens = "".join(f'[[pools.default.tokens]]\nname = "{name}"\ntoken = "{bot.token}"\n'
                     for name, bot in zip(("alpha", "bravo"), sim.bots, strict=True))
    path.write_text(f'[store]\npath = "{path.parent / "unused.db"}"\n\n'
                    f'[telegram]\napi_base_url = "{sim.url}"\n\n[pools.default]\n{tokens}',
                    encoding="utf-8")
    return path


def test_tokens_validate_prints_each_token_and_exits_zero_when_all_are_valid(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with BotApiSimulator(bots=make_bots(2)) as sim:
        config = write_config(tmp_path / "tgrelay.toml", sim)
        code = main(["tokens", "validate", "-c", str(config)])

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0].split() == ["NAME", "POOL", "VALID", "BOT", "ERROR"]
    assert lines[1].split() == ["alpha", "default", "yes", "@alpha_bot"]
    assert lines[2].split() == ["bravo", "default", "yes", "@bravo_bot"]


def test_tokens_validate_exits_one_and_says_why_when_a_token_is_revoked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with BotApiSimulator(bots=make_bots(2)) as sim:
        sim.revoke(sim.bots[1])
        config = write_config(tmp_path / "tgrelay.toml", sim)
        code = main(["tokens", "validate", "-c", str(config), "--json"])
        secrets = [bot.token.split(":")[1] for bot in sim.bots]

    output = capsys.readouterr().out
    assert code == 1
    assert json.loads(output) == [
        {"name": "alpha", "pool": "default", "valid": True, "bot_username": "alpha_bot",
         "error": None},
        {"name": "bravo", "pool": "default", "valid": False, "bot_username": None,
         "error": "Unauthorized"},
    ]
    assert not any(secret in output for secret in secrets)


def test_tokens_validate_reports_an_unreachable_api_as_invalid(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with BotApiSimulator(bots=make_bots(2)) as sim:
        config = write_config(tmp_path / "tgrelay.toml", sim)
    # the simulator is gone: nothing listens at its address any more
    code = main(["tokens", "validate", "-c", str(config)])

    output = capsys.readouterr().out
    assert code == 1
    assert "could not connect" in output
