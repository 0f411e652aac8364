"""Log formats: text with key=value extras, JSON one object per line."""

from __future__ import annotations

import json
import logging

from agent.logs import JsonFormatter, TextFormatter


def _record(**extra: object) -> logging.LogRecord:
    rec = logging.makeLogRecord({"name": "agent.test", "levelno": logging.INFO,
                                 "levelname": "INFO", "msg": "renewal %s", "args": ("done",)})
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_json_lines_carry_message_level_and_extra_fields() -> None:
    line = JsonFormatter().format(_record(certificate="www", outcome="renewed"))
    doc = json.loads(line)
    assert doc["message"] == "renewal done"
    assert doc["level"] == "info"
    assert doc["certificate"] == "www"
    assert doc["outcome"] == "renewed"
    assert "\n" not in line


def test_text_lines_append_extras_as_key_value() -> None:
    line = TextFormatter().format(_record(certificate="www", reason="not due"))
    assert "renewal done" in line
    assert line.endswith("certificate=www reason=not due")
