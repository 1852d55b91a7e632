"""``tgrelay tokens validate``: ``getMe`` for every configured token, no running relay needed.

Prints a table (or ``--json``) of name, pool, valid, bot username and error; exits 1 if any
token is invalid or could not be checked. Secrets are used only in request URLs; every error
shown is cleaned of them.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from actors.token import check_token, token_settings_from_config
from supervision.config import Config, load_config, resolve_config_path

MAX_PARALLEL_CHECKS = 8


def check_all(config: Config) -> list[dict[str, Any]]:
    """One entry per configured token, in file order: name, pool, valid, bot_username, error."""
    tokens = [token_settings_from_config(token.name, pool, token.token, token.weight,
                                         token.max_per_second, config.telegram)
              for pool, token in config.tokens()]
    if not tokens:
        return []
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_CHECKS, len(tokens))) as pool:
        checks = list(pool.map(check_token, tokens))
    return [{"name": token.name, "pool": token.pool, "valid": bool(checked.valid),
             "bot_username": checked.bot_username, "error": checked.error}
            for token, checked in zip(tokens, checks, strict=True)]


def format_table(entries: list[dict[str, Any]]) -> str:
    header = ("NAME", "POOL", "VALID", "BOT", "ERROR")
    rows = [(e["name"], e["pool"], "yes" if e["valid"] else "no",
             f"@{e['bot_username']}" if e["bot_username"] else "-", e["error"] or "")
            for e in entries]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, str(row[-1])]).rstrip())
    return "\n".join(lines)


def validate(args: argparse.Namespace) -> int:
    config = load_config(resolve_config_path(args.config))
    entries = check_all(config)
    if args.json:
        print(json.dumps(entries, indent=2))
    elif entries:
        print(format_table(entries))
    else:
        print("no tokens are configured (add [[pools.<name>.tokens]] entries)")
    return 1 if any(not entry["valid"] for entry in entries) else 0
