"""Chaos suite fixtures: the simulator, a scenario directory, and the bounded or soak scale.

The directory is named ``test_chaos`` (not ``chaos``) so that pytest loads this conftest at
start-up from the repository root: ``pytest --soak`` then works without naming the directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from simulator import BotApiSimulator, Limits, Rate, make_bots
from tests.test_chaos.harness import AUDITS, ChaosRun

SOAK_TIMEOUT_SECONDS = 1800


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", default=False,
                     help="run the chaos suite longer: more messages, kills and longer storms")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        for item in items:
            if item.get_closest_marker("chaos") is not None:
                item.add_marker(pytest.mark.timeout(SOAK_TIMEOUT_SECONDS))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if AUDITS:
        terminalreporter.section("chaos audits")
        for audit in AUDITS:
            terminalreporter.write_line(audit.summary())


@dataclass(frozen=True)
class Scale:
    """How hard a scenario pushes: bounded for CI (a few minutes for the suite), or a soak."""

    soak: bool

    def pick(self, bounded: float, soak: float) -> float:
        return soak if self.soak else bounded

    def count(self, bounded: int, soak: int) -> int:
        return soak if self.soak else bounded


@pytest.fixture
def scale(request: pytest.FixtureRequest) -> Scale:
    return Scale(bool(request.config.getoption("--soak")))


@pytest.fixture
def simulator() -> Iterator[BotApiSimulator]:
    """Four bots; Telegram's per-chat limit, a per-bot limit above what each token may send."""
    limits = Limits(per_bot=Rate(300, 1.0), per_private_chat=Rate(1, 1.0), per_group=Rate(20, 60.0))
    with BotApiSimulator(bots=make_bots(4), limits=limits, seed=20261204) as sim:
        yield sim


@pytest.fixture
def chaos(request: pytest.FixtureRequest, tmp_path: Path, simulator: BotApiSimulator) -> ChaosRun:
    return ChaosRun(request.node.name.removeprefix("test_"), tmp_path, simulator)
