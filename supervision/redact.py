"""Keep bot token secrets out of every output (DESIGN.md 8).

Tokens are used only inside request URLs; this is the safety net for everything else: a
logging filter that rewrites any record, and a function that cleans exception text.
"""

from __future__ import annotations

import logging
import re

# <bot id>:<secret>, as BotFather issues them; also inside URLs like /bot123:ABC.../sendMessage
TOKEN_PATTERN = re.compile(r"(?<![0-9])([0-9]{5,16}):[A-Za-z0-9_-]{30,64}")


def redact(text: str) -> str:
    """Replace every token-shaped substring with ``<bot id>:***``."""
    return TOKEN_PATTERN.sub(r"\1:***", text)


class RedactingFilter(logging.Filter):
    """Formats the record's message and exception now, redacted, so no handler sees a secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg = redact(message)
        record.args = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_log_redaction() -> None:
    """Attach the filter to every handler of the root logger (filters on loggers don't
    apply to records propagated from child loggers; handler filters do)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
