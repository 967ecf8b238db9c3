"""Logging setup: levels from ``-v``, plain text for people or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg"}`` per line, plus the exception when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(verbose: int, fmt: str = "text") -> None:
    """iptsync's own loggers at warning, info (``verbose`` 1) or debug (2); from 3 on, every
    library's debug output too (urllib3, the kubernetes client, pyroute2, asyncio), which
    otherwise stays at warning: at debug it buries iptsync's lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose >= 3 else logging.WARNING)
    logging.getLogger("iptsync").setLevel(logging.WARNING - 10 * min(verbose, 2))
