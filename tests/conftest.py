"""Shared fixtures: real SQLite files in a temporary directory, configs parsed from TOML text."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pykka
import pytest

from actors.store import StoreClient, StoreSettings, start_store
from supervision.config import Config, parse_config

FAKE_SECRET = "A" * 35


def fake_token(bot_id: int = 123456789) -> str:
    """A well-formed bot token that is not real (for configs; the simulator makes its own)."""
    return f"{bot_id}:{FAKE_SECRET}"


def config_text(tmp_path: Path, extra: str = "", pools: str | None = None) -> str:
    pools = pools if pools is not None else (
        '[pools.default]\n[[pools.default.tokens]]\nname = "alpha"\n'
        f'token = "{fake_token()}"\n')
    return (f'[store]\npath = "{tmp_path / "tgrelay.db"}"\n'
            f'archive_path = "{tmp_path / "archive.db"}"\n{extra}\n\n{pools}')


@pytest.fixture
def make_config(tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(extra: str = "", pools: str | None = None) -> Config:
        return parse_config(config_text(tmp_path, extra, pools), environ={})

    return make


class StoreAlerts:
    """An alert sink that remembers what it was told."""

    def __init__(self) -> None:
        self.raised: list[tuple[str, str]] = []

    def __call__(self, kind: str, text: str) -> None:
        self.raised.append((kind, text))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.raised]


@pytest.fixture
def alerts() -> StoreAlerts:
    return StoreAlerts()


@pytest.fixture(params=["sqlite"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path, alerts: StoreAlerts
                  ) -> Iterator:  # type: ignore[type-arg]
    """Starts a store backend; the contract suite runs against every backend listed here."""
    started: list[StoreClient] = []

    def start(metrics: object = None, clock: object = None, **overrides: object) -> StoreClient:
        options = {"path": str(tmp_path / "store.db"), "archive_path": str(tmp_path / "archive.db"),
                   **overrides}
        settings = StoreSettings(**options)  # type: ignore[arg-type]
        extra = {"clock": clock} if clock is not None else {}
        client = start_store(settings, metrics, alert=alerts, **extra)  # type: ignore[arg-type]
        started.append(client)
        return client

    yield start
    for client in started:
        if client.actor.is_alive():
            client.actor.stop()


@pytest.fixture
def store(store_factory) -> StoreClient:  # type: ignore[no-untyped-def]
    return store_factory()


@pytest.fixture(autouse=True)
def _no_leftover_actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all()


@pytest.fixture(autouse=True)
def _quiet_pykka() -> None:
    logging.getLogger("pykka").setLevel(logging.WARNING)
