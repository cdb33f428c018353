"""Logs are JSON lines for machines and readable lines on a terminal."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from processor.logs import configure_logging, get_logger, renders_console
from processor.settings import SettingsError, load_settings


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def _emit(stream: io.StringIO, log_format: str) -> str:
    configure_logging("info", stream=stream, log_format=log_format)
    get_logger("t").warning("graph.throttled", account_id="acc-1", retry_after_s=5, token="x")
    return stream.getvalue()


def test_auto_is_json_when_not_a_terminal():
    """With the default format, output to a pipe or file is one JSON object per line."""
    line = _emit(io.StringIO(), "auto").strip()
    event = json.loads(line)
    assert event["event"] == "graph.throttled"
    assert event["account_id"] == "acc-1"
    assert event["level"] == "warning"
    assert event["token"] == "[redacted]"


def test_auto_is_readable_on_a_terminal():
    """With the default format, output to a terminal is a console line, not JSON, with secrets still redacted."""
    text = _emit(_Terminal(), "auto")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert "graph.throttled" in text
    assert "account_id" in text
    assert "acc-1" in text
    assert "[redacted]" in text
    assert "token=x" not in text


def test_forced_formats_win_over_the_stream():
    """`console` renders for people even into a pipe (without colour codes); `json` stays JSON on a terminal."""
    plain = _emit(io.StringIO(), "console")
    assert "graph.throttled" in plain
    assert "\x1b[" not in plain
    with pytest.raises(json.JSONDecodeError):
        json.loads(plain)
    assert json.loads(_emit(_Terminal(), "json"))["event"] == "graph.throttled"


def test_unknown_format_is_refused():
    """An unknown format is an error naming the choices, in code and in the settings."""
    with pytest.raises(ValueError, match="auto, console, json"):
        renders_console("xml", io.StringIO())
    with pytest.raises(SettingsError, match="M365SYNC_LOG_FORMAT"):
        load_settings({"M365SYNC_LOG_FORMAT": "xml"}, required=frozenset())
    assert (
        load_settings({"M365SYNC_LOG_FORMAT": "Console"}, required=frozenset()).log_format
        == "console"
    )
    assert load_settings({}, required=frozenset()).log_format == "auto"
