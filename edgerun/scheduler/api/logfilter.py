"""What the HTTP server logs, made safe (issue 23): a token or stream ticket in a URL's
query (`?access_token=`, `?ticket=`) is redacted from every line uvicorn logs, and the
line uvicorn writes when the API ends a stuck stream reader's response on purpose is
an INFO, not an ERROR."""

from __future__ import annotations

import logging
import re

SECRET_IN_QUERY = re.compile(r"((?:access_token|ticket|token)=)[^&\s\"']+", re.I)
UNFINISHED = "ASGI callable returned without completing response."
LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


class Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        if message == UNFINISHED:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = ("a stream's response ended unfinished (a reader that "
                                       "stopped reading was cut off)"), None
            return True
        redacted = SECRET_IN_QUERY.sub(r"\1REDACTED", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def install() -> None:
    """Once per logger: on uvicorn's loggers, where request lines are written."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, Redact) for f in logger.filters):
            logger.addFilter(Redact())
