"""tgrelay's supervision side: starting and stopping the system, config, the command line."""

from actors.errors import (
    ConfigError,
    DedupConflict,
    InvalidMessage,
    MessageNotFound,
    StoreUnavailable,
    TgrelayError,
    UnknownPool,
)
from actors.messages import Receipt, StoredMessage
from supervision.config import Config, load_config, parse_config
from supervision.relay import RelaySystem

__all__ = [
    "Config",
    "ConfigError",
    "DedupConflict",
    "InvalidMessage",
    "MessageNotFound",
    "Receipt",
    "RelaySystem",
    "StoreUnavailable",
    "StoredMessage",
    "TgrelayError",
    "UnknownPool",
    "load_config",
    "parse_config",
]
