"""rebuild's diagnostic log on stderr, through structlog, which is imported only when a line is
written: most runs write none, and structlog (with the asyncio it pulls in) would cost about
40 ms of every task's start (issue #17). Human lines on a terminal, JSON lines with --json;
secret-looking keys are blanked."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

from rebuild.audit import is_secret_key

_settings: dict[str, bool] = {"json_output": False, "verbose": False}
_context: dict[str, Any] = {}  # bound for the whole run (one run per process)
_logger: Any = None


def configure(*, json_output: bool, verbose: bool = False) -> None:
    global _logger
    _settings.update(json_output=json_output, verbose=verbose)
    _logger = None


def bind(**values: Any) -> None:
    """Fields every later line carries (the run id)."""
    _context.update(values)


def clear() -> None:
    _context.clear()


def debug(event: str, **fields: Any) -> None:
    if _settings["verbose"]:
        _emit("debug", event, fields)


def warning(event: str, **fields: Any) -> None:
    _emit("warning", event, fields)


def exception(event: str, **fields: Any) -> None:
    """An error line with the current exception's traceback (plain, no local variables)."""
    _emit("exception", event, fields)


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: no secret-looking key ever reaches a log line."""
    for key in list(event_dict):
        if is_secret_key(key):
            event_dict[key] = "[redacted]"
    return event_dict


def _emit(method: str, event: str, fields: dict[str, Any]) -> None:
    global _logger
    if _logger is None:
        _logger = _structlog_logger()
    getattr(_logger, method)(event, **{**_context, **fields})


def _structlog_logger() -> Any:
    import structlog

    renderer: Any
    if _settings["json_output"]:
        renderer = structlog.processors.JSONRenderer()
    else:
        colors = sys.stderr.isatty() and "NO_COLOR" not in os.environ
        # plain tracebacks: rich's (the default when rich is installed) prints local
        # variables, and a local may hold a sudo password
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=structlog.dev.plain_traceback
        )
    level = logging.DEBUG if _settings["verbose"] else logging.INFO
    return structlog.wrap_logger(
        structlog.PrintLogger(file=sys.stderr),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
    )
