"""Logging through loguru, configured once; uvicorn's, httpx's and aiohttp's stdlib logs routed into it.

Never log keys or request bodies: request lines carry the key's id, the model, the host, the status
and the timings, nothing else. Text a client chose (a model name, a path, a header value) goes
through `clean()` before it reaches a line, so it cannot forge lines or drive a terminal.

The log file is private to its owner (mode 0600), and so is a folder made for it (0700).
"""

from __future__ import annotations

import inspect
import logging
import os
import stat
import sys
import unicodedata
from pathlib import Path

from loguru import logger

CONSOLE_FORMAT = "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}"
FILE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {name}:{line} {message}"
FILE_MODE = 0o600
DIR_MODE = 0o700

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
# Controls (C0, DEL, C1), invisible format characters (bidi overrides, zero-width ones), lone
# surrogates, and the Unicode line and paragraph separators.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape(char: str) -> str:
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    if char.isprintable() or unicodedata.category(char) not in _ESCAPED_CATEGORIES:
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def clean(text: str, limit: int = 200) -> str:
    """`text` made safe for one log line: control characters, line breaks and backslashes escaped
    (`\\n`, `\\x1b`, `\\u2028`, `\\\\`), and at most `limit` characters of it, marked when cut
    (`…(+123)`: 123 more characters of the original were left out). An escape is never split.
    """
    if len(text) <= limit and text.isprintable() and "\\" not in text:
        return text
    head = text[:limit]
    if head.isprintable() and "\\" not in head:
        return f"{head}…(+{len(text) - limit})"
    pieces: list[str] = []
    used = 0
    for index, char in enumerate(text):
        piece = char if char.isprintable() and char != "\\" else _escape(char)
        used += len(piece)
        if used > limit:
            return "".join(pieces) + f"…(+{len(text) - index})"
        pieces.append(piece)
    return "".join(pieces)


def _private_opener(path: str, flags: int) -> int:
    """Open a log file as loguru asks, creating it (at start and at each rotation) with mode 0600."""
    return os.open(path, flags, FILE_MODE)


def _make_private(log_file: Path) -> None:
    """Create the log's folder (0700) if it is missing; tighten the log and its rotated files to 0600."""
    folder = log_file.parent
    if not folder.exists():
        folder.mkdir(parents=True, mode=DIR_MODE, exist_ok=True)
    for path in [log_file, *folder.glob(f"{log_file.stem}.*{log_file.suffix}")]:
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        try:
            if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & ~FILE_MODE:
                path.chmod(FILE_MODE)
        except OSError as exc:
            logger.warning("cannot make the log file {} private: {}", path, exc.strerror or exc)


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
        _make_private(Path(log_file))
        logger.add(
            log_file,
            level=level,
            format=FILE_FORMAT,
            rotation="20 MB",
            retention=5,
            backtrace=False,
            diagnose=False,
            opener=_private_opener,
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
