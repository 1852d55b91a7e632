"""Load and validate the TOML configuration (see CONTRACT.md, "Config file").

Every problem is a :class:`ConfigError` naming the key (``pools.default.tokens[1].token``) and
what is wrong with it. Token secrets are never part of an error message.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.errors import ConfigError

DEFAULT_CONFIG_PATH = "conf/tgrelay.toml"
BOT_TOKEN_SHAPE = re.compile(r"[0-9]{5,16}:[A-Za-z0-9_-]{30,64}")  # used with fullmatch
TOKEN_NAME_SHAPE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # used with fullmatch
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ALERT_THRESHOLDS = ("delivery_rate_threshold", "delivery_rate_window_seconds",
                     "backlog_age_seconds", "repeat_minutes")


@dataclass(frozen=True)
class StoreConfig:
    path: str = "var/tgrelay.db"
    synchronous: str = "full"
    retention_days: float = 30.0
    archive_path: str = "var/archive.db"
    busy_timeout_ms: int = 5000
    max_db_megabytes: int = 0
    integrity_check_minutes: float = 60.0


@dataclass(frozen=True)
class DedupConfig:
    window_seconds: float = 300.0
    ttl_seconds: float = 86400.0


@dataclass(frozen=True)
class TelegramConfig:
    api_base_url: str = "https://api.telegram.org"
    request_timeout_seconds: float = 10.0
    per_chat_per_second: float = 1.0
    per_group_per_minute: float = 20.0


@dataclass(frozen=True)
class HttpConfig:
    listen: str = "127.0.0.1:8780"
    auth_token: str = ""

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


@dataclass(frozen=True)
class StatsdConfig:
    host: str = "127.0.0.1"
    port: int = 8125
    prefix: str = "tgrelay"


@dataclass(frozen=True)
class AlertsConfig:
    chat_id: int | str
    pool: str
    delivery_rate_threshold: float = 0.95        # alert when a smaller share of finished messages
    delivery_rate_window_seconds: float = 300.0  # ... over this window was confirmed
    backlog_age_seconds: float = 600.0           # alert when the oldest pending message is older
    repeat_minutes: float = 15.0                 # the same alert at most once this often


@dataclass(frozen=True)
class TokenConfig:
    name: str
    token: str = field(repr=False)  # the secret: never in repr, logs or errors
    weight: float = 1
    max_per_second: float = 30


@dataclass(frozen=True)
class PoolConfig:
    name: str
    tokens: tuple[TokenConfig, ...]


@dataclass(frozen=True)
class Config:
    store: StoreConfig = field(default_factory=StoreConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    telegram: TelegramConfig = field(default_factory=TelegramConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    statsd: StatsdConfig | None = None
    alerts: AlertsConfig | None = None
    pools: Mapping[str, PoolConfig] = field(default_factory=dict)

    def tokens(self) -> list[tuple[str, TokenConfig]]:
        """Every (pool name, token) pair, in file order."""
        return [(pool.name, token) for pool in self.pools.values() for token in pool.tokens]


def resolve_config_path(cli_path: str | None) -> Path:
    """``-c PATH``, else ``$TGRELAY_CONFIG``, else ``conf/tgrelay.toml``."""
    return Path(cli_path or os.environ.get("TGRELAY_CONFIG") or DEFAULT_CONFIG_PATH)


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, substitute ``${VAR}`` and validate a config file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError("", f"cannot read config file {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError("", f"config file {path} is not UTF-8 text (byte {error.start} "
                              f"cannot be decoded)") from None
    return parse_config(text, environ)


def parse_config(text: str, environ: Mapping[str, str] | None = None) -> Config:
    """Validate TOML text; ``environ`` defaults to ``os.environ``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("", f"not valid TOML: {error}") from None
    except RecursionError:
        raise ConfigError("", "not valid TOML: nested too deeply") from None
    return _Reader(os.environ if environ is None else environ).config(raw)


class _Reader:
    """Walks the parsed TOML, checking each key against what the contract allows."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def config(self, raw: dict[str, Any]) -> Config:
        _reject_unknown(raw, "", {"store", "dedup", "telegram", "http", "statsd", "alerts", "pools"})
        store = self._section(raw, "store", StoreConfig)
        if store.synchronous not in ("full", "normal"):
            raise ConfigError("store.synchronous", f'must be "full" or "normal", not {store.synchronous!r}')
        _require_positive(store.retention_days, "store.retention_days")
        _require_positive(store.integrity_check_minutes, "store.integrity_check_minutes")
        if store.max_db_megabytes < 0 or store.busy_timeout_ms < 0:
            key = "store.max_db_megabytes" if store.max_db_megabytes < 0 else "store.busy_timeout_ms"
            raise ConfigError(key, "must not be negative")
        if not store.path:
            raise ConfigError("store.path", "must not be empty")
        dedup = self._section(raw, "dedup", DedupConfig)
        _require_positive(dedup.window_seconds, "dedup.window_seconds")
        _require_positive(dedup.ttl_seconds, "dedup.ttl_seconds")
        if dedup.ttl_seconds < dedup.window_seconds:
            raise ConfigError("dedup.ttl_seconds", "must be at least dedup.window_seconds")
        telegram = self._section(raw, "telegram", TelegramConfig)
        if not re.match(r"^https?://[^/\s]+", telegram.api_base_url):
            raise ConfigError("telegram.api_base_url", "must be an http:// or https:// URL")
        for key in ("request_timeout_seconds", "per_chat_per_second", "per_group_per_minute"):
            _require_positive(getattr(telegram, key), f"telegram.{key}")
        http = self._http(raw)
        statsd = self._section(raw, "statsd", StatsdConfig) if "statsd" in raw else None
        if statsd is not None and not 0 < statsd.port < 65536:
            raise ConfigError("statsd.port", "must be between 1 and 65535")
        pools = self._pools(raw.get("pools"))
        alerts = self._alerts(raw.get("alerts"), pools) if "alerts" in raw else None
        return Config(store, dedup, telegram, http, statsd, alerts, pools)

    def _section(self, raw: dict[str, Any], name: str, kind: type[Any]) -> Any:
        section = raw.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(name, "must be a table")
        defaults = kind()
        _reject_unknown(section, name, set(vars(defaults)))
        values = {}
        for key, default in vars(defaults).items():
            if key in section:
                values[key] = self._typed(section[key], type(default), f"{name}.{key}")
        return kind(**values)

    def _typed(self, value: Any, expected: type, key: str) -> Any:
        if isinstance(value, str):
            value = self._substitute(value, key)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if expected is int and isinstance(value, bool):
            raise ConfigError(key, "must be an integer, not a boolean")
        if not isinstance(value, expected):
            raise ConfigError(key, f"must be {_type_name(expected)}, not {_type_name(type(value))}")
        return value

    def _substitute(self, value: str, key: str) -> str:
        def lookup(match: re.Match[str]) -> str:
            variable = match.group(1)
            if variable not in self._environ:
                raise ConfigError(key, f"environment variable {variable} is not set")
            return self._environ[variable]

        return _ENV_REFERENCE.sub(lookup, value)

    def _http(self, raw: dict[str, Any]) -> HttpConfig:
        section = raw.get("http", {})
        if not isinstance(section, dict):
            raise ConfigError("http", "must be a table")
        _reject_unknown(section, "http", {"listen", "auth_token"})
        listen = self._typed(section.get("listen", HttpConfig.listen), str, "http.listen")
        match = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^:\[\]]+):([0-9]{1,5})", listen)
        if not match or not 0 <= int(match.group(2)) < 65536:
            raise ConfigError("http.listen", f"must be HOST:PORT, not {listen!r}")
        auth_token = self._typed(section.get("auth_token", ""), str, "http.auth_token")
        http = HttpConfig(listen, auth_token)
        if not auth_token and not _is_loopback(http.host):
            raise ConfigError(
                "http.auth_token", f"is required when http.listen ({listen}) is not a loopback address"
            )
        return http

    def _pools(self, raw: Any) -> dict[str, PoolConfig]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise ConfigError("pools", "must be a table of pools")
        pools: dict[str, PoolConfig] = {}
        seen_names: dict[str, str] = {}
        for pool_name, section in raw.items():
            key = f"pools.{pool_name}"
            if not isinstance(section, dict):
                raise ConfigError(key, "must be a table")
            _reject_unknown(section, key, {"tokens"})
            entries = section.get("tokens", [])
            if not isinstance(entries, list):
                raise ConfigError(f"{key}.tokens", "must be an array of tables ([[...tokens]])")
            if not entries:
                raise ConfigError(f"{key}.tokens", "the pool is empty: list at least one token")
            tokens = []
            for index, entry in enumerate(entries):
                token = self._token(entry, f"{key}.tokens[{index}]")
                if token.name in seen_names:
                    raise ConfigError(
                        f"{key}.tokens[{index}].name",
                        f"duplicate token name {token.name!r} (also in pools.{seen_names[token.name]})",
                    )
                seen_names[token.name] = pool_name
                tokens.append(token)
            pools[pool_name] = PoolConfig(pool_name, tuple(tokens))
        return pools

    def _token(self, entry: Any, key: str) -> TokenConfig:
        if not isinstance(entry, dict):
            raise ConfigError(key, "must be a table")
        _reject_unknown(entry, key, {"name", "token", "weight", "max_per_second"})
        for required in ("name", "token"):
            if required not in entry:
                raise ConfigError(f"{key}.{required}", "is required")
        name = self._typed(entry["name"], str, f"{key}.name")
        if not TOKEN_NAME_SHAPE.fullmatch(name):
            raise ConfigError(f"{key}.name", "must be 1-64 letters, digits, '_' or '-'")
        secret = self._typed(entry["token"], str, f"{key}.token")
        if not BOT_TOKEN_SHAPE.fullmatch(secret):
            raise ConfigError(
                f"{key}.token", "is not a bot token (expected <bot id>:<secret> as BotFather issues it)"
            )
        weight = self._typed(entry.get("weight", 1), float, f"{key}.weight")
        max_per_second = self._typed(entry.get("max_per_second", 30), float, f"{key}.max_per_second")
        _require_positive(weight, f"{key}.weight")
        _require_positive(max_per_second, f"{key}.max_per_second")
        return TokenConfig(name, secret, weight, max_per_second)

    def _alerts(self, raw: Any, pools: Mapping[str, PoolConfig]) -> AlertsConfig:
        if not isinstance(raw, dict):
            raise ConfigError("alerts", "must be a table")
        _reject_unknown(raw, "alerts", {"chat_id", "pool", *_ALERT_THRESHOLDS})
        if "chat_id" not in raw:
            raise ConfigError("alerts.chat_id", "is required")
        chat_id = raw["chat_id"]
        if isinstance(chat_id, bool) or not isinstance(chat_id, int | str):
            raise ConfigError("alerts.chat_id", "must be an integer or an @channel name")
        pool = self._typed(raw.get("pool", "default"), str, "alerts.pool")
        if pool not in pools:
            raise ConfigError("alerts.pool", f"names pool {pool!r}, which is not defined under [pools]")
        thresholds = {key: self._typed(raw[key], float, f"alerts.{key}")
                      for key in _ALERT_THRESHOLDS if key in raw}
        for key, value in thresholds.items():
            _require_positive(value, f"alerts.{key}")
        if thresholds.get("delivery_rate_threshold", 0.0) > 1:
            raise ConfigError("alerts.delivery_rate_threshold",
                              "is a fraction of finished messages: between 0 and 1")
        return AlertsConfig(chat_id, pool, **thresholds)


def _reject_unknown(section: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    for key in section:
        if key not in allowed:
            name = f"{where}.{key}" if where else key
            if not key:  # TOML allows "" as a key; name it visibly
                name = f'{where}.""' if where else '""'
            raise ConfigError(name, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _require_positive(value: float, key: str) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(key, f"must be a finite number greater than 0, not {value}")


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "an array", dict: "a table"}.get(kind, kind.__name__)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
