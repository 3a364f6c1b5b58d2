"""`logs.clean` for client-chosen text in log lines, and the log file's permissions."""

from __future__ import annotations

import logging
import os
import stat
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from gpumanager import logs
from gpumanager.logs import clean


def test_plain_text_is_returned_as_it_is() -> None:
    for text in ["llama3.2:latest", "/api/chat", "hf.co/org/Model-GGUF:Q4_K_M", "", "café 模型 😀", "a b"]:
        assert clean(text) == text
    name = "qwen2.5-coder:7b-instruct"
    assert clean(name) is name


def test_line_breaks_and_controls_are_escaped() -> None:
    assert clean("llama3\nINFO fake line") == "llama3\\nINFO fake line"
    assert clean("a\r\nb\tc") == "a\\r\\nb\\tc"
    assert clean("x\x00y\x7fz\x85") == "x\\x00y\\x7fz\\x85"
    assert clean("a\u2028b\u2029c") == "a\\u2028b\\u2029c"
    assert clean("\x0b\x0c\x1c\x1d\x1e") == "\\x0b\\x0c\\x1c\\x1d\\x1e"


def test_ansi_escapes_cannot_drive_a_terminal() -> None:
    assert clean("\x1b[31mred\x1b[0m") == "\\x1b[31mred\\x1b[0m"
    assert clean("\x9b31m") == "\\x9b31m"  # the C1 form of the escape
    assert "\x1b" not in clean("\x1b]0;title\x07")


def test_invisible_format_characters_are_shown() -> None:
    assert clean("abc\u202edcb") == "abc\\u202edcb"  # right-to-left override
    assert clean("a\u200bb") == "a\\u200bb"  # zero-width space
    assert clean("\ud800") == "\\ud800"  # a lone surrogate, which no file encoding accepts


def test_backslashes_are_escaped_so_escapes_are_unambiguous() -> None:
    assert clean("a\\nb") == "a\\\\nb"
    assert clean("a\\nb") != clean("a\nb")


def test_long_text_is_cut_with_a_marker_of_what_was_left_out() -> None:
    assert clean("a" * 1000) == "a" * 200 + "…(+800)"
    assert clean("a" * 201) == "a" * 200 + "…(+1)"
    assert clean("a" * 200) == "a" * 200
    assert clean("abcdef", 3) == "abc…(+3)"
    assert clean("\n" * 100, 10) == "\\n" * 5 + "…(+95)"


def test_an_escape_is_never_split_by_the_cut() -> None:
    assert clean("abc\x1b", 5) == "abc…(+1)"
    assert clean("abc\x1b", 7) == "abc\\x1b"
    assert clean("ab\u2028cd", 4) == "ab…(+3)"


def test_every_output_fits_one_line_whatever_the_input() -> None:
    text = "".join(chr(c) for c in range(0x3000)) + "\U0001f600\U000e0001"
    for out in (clean(text, 1_000_000), clean(text)):
        assert len(out.splitlines()) == 1
        assert not [c for c in out if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")]
    assert clean(text, 1_000_000).endswith("😀\\U000e0001")


def _to_stderr(message: object) -> None:
    sys.stderr.write(str(message))


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`logs.setup` reconfigures loguru and the stdlib loggers: put things back for the other tests."""
    names = ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "httpcore", "aiohttp", "botocore", "urllib3")
    saved = [(logging.getLogger(n), logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in names]
    saved_levels = {n: logging.getLogger(n).level for n in names}
    root = logging.getLogger()
    root_handlers, root_level = root.handlers[:], root.level
    try:
        yield
    finally:
        logger.remove()
        logger.add(_to_stderr, level="DEBUG")
        root.handlers[:] = root_handlers
        root.setLevel(root_level)
        for stdlib, handlers, propagate in saved:
            stdlib.handlers[:] = handlers
            stdlib.propagate = propagate
            stdlib.setLevel(saved_levels[stdlib.name])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("restore_logging")
def test_the_log_file_and_its_new_folder_are_private(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        log_file = tmp_path / "var" / "logs" / "app.log"
        logs.setup("INFO", str(log_file), console=False)
        logger.info("a line")
        assert "a line" in log_file.read_text()
        assert mode(log_file) == 0o600
        assert mode(log_file.parent) == 0o700
    finally:
        os.umask(old_umask)


@pytest.mark.usefixtures("restore_logging")
def test_an_existing_log_file_with_wider_permissions_is_tightened(tmp_path: Path) -> None:
    log_file = tmp_path / "app.log"
    log_file.write_text("old line\n")
    log_file.chmod(0o644)
    rotated = tmp_path / "app.2024-01-01_00-00-00_000000.log"
    rotated.write_text("older line\n")
    rotated.chmod(0o666)
    other = tmp_path / "notes.txt"
    other.write_text("not a log\n")
    other.chmod(0o644)
    folder_mode = mode(tmp_path)
    logs.setup("INFO", str(log_file), console=False)
    logger.info("a new line")
    assert mode(log_file) == 0o600 and mode(rotated) == 0o600
    assert mode(other) == 0o644  # only the log's own files
    text = log_file.read_text()
    assert text.startswith("old line\n") and "a new line" in text  # appended, not replaced
    assert mode(tmp_path) == folder_mode  # an existing folder is left as it is


@pytest.mark.usefixtures("restore_logging")
def test_files_made_by_rotation_are_private_too(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        log_file = tmp_path / "logs" / "app.log"
        logs.setup("INFO", str(log_file), console=False)
        chunk = "x" * (1 << 20)
        for _ in range(22):  # 22 MB: past the 20 MB rotation
            logger.info(chunk)
        files = sorted(log_file.parent.iterdir())
        assert len(files) >= 2 and log_file in files
        assert {path.name: mode(path) for path in files} == {path.name: 0o600 for path in files}
    finally:
        os.umask(old_umask)
