"""Logging through loguru, configured once; uvicorn's, httpx's and aiohttp's stdlib logs routed into it.

Never log keys or request bodies: request lines carry the key's id, the model, the host, the status
and the timings, nothing else.
"""

from __future__ import annotations

import inspect
import logging
import sys
from pathlib import Path

from loguru import logger

CONSOLE_FORMAT = "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}"
FILE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {name}:{line} {message}"


class InterceptHandler(logging.Handler):
    """Send stdlib log records to loguru, at the caller's depth so the origin stays right."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame, depth = inspect.currentframe(), 0
        while frame is not None and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame, depth = frame.f_back, depth + 1
        logger.opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())


def setup(level: str = "INFO", log_file: str | None = None, *, console: bool = True) -> None:
    logger.remove()
    if console:
        logger.add(sys.stderr, level=level, format=CONSOLE_FORMAT, colorize=None, backtrace=False, diagnose=False)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        logger.add(
            log_file, level=level, format=FILE_FORMAT, rotation="20 MB", retention=5, backtrace=False, diagnose=False
        )
    # The stdlib level matters for speed too: below INFO, uvicorn wraps every request in a
    # message-logging middleware.
    stdlib_level = logging.getLevelName(level) if isinstance(logging.getLevelName(level), int) else logging.INFO
    logging.basicConfig(handlers=[InterceptHandler()], level=stdlib_level, force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "httpcore", "aiohttp"):
        stdlib = logging.getLogger(name)
        stdlib.handlers = [InterceptHandler()]
        stdlib.propagate = False
        stdlib.setLevel(stdlib_level)
    for noisy in ("httpx", "httpcore", "aiohttp", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
