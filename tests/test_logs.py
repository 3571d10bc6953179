"""Log output: text and JSON lines, structured extras, idempotent setup."""

from __future__ import annotations

import datetime
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from p2pfed.logs import setup_logging

TEXT_LINE = re.compile(
    r"(?P<date>\d{4}-\d\d-\d\d) (?P<time>\d\d:\d\d:\d\d\.\d{3}) (?P<level>[A-Z]+) +"
    r"(?P<logger>[\w.]+): (?P<rest>.*)"
)


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def _json_lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_text_format_with_extras() -> None:
    out = io.StringIO()
    setup_logging("text", "INFO", out)
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    logging.getLogger("p2pfed.node").info(
        "group done", extra={"group": "ab12", "round": 3, "peer": "a b", "key": b"\x01\xff"}
    )
    after = datetime.datetime.now(datetime.UTC)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    m = TEXT_LINE.fullmatch(lines[0])
    assert m, lines[0]
    assert m["level"] == "INFO"
    assert m["logger"] == "p2pfed.node"
    # Two spaces after a 4-letter level: levels are padded to 5 characters.
    assert " INFO  p2pfed.node: " in lines[0]
    assert m["rest"] == 'group done group=ab12 round=3 peer="a b" key=01ff'
    stamp = datetime.datetime.fromisoformat(f"{m['date']}T{m['time']}+00:00")
    assert before <= stamp <= after  # the time is UTC


def test_json_lines_with_extras() -> None:
    out = io.StringIO()
    setup_logging("json", "DEBUG", out)
    log = logging.getLogger("p2pfed.test")
    log.debug("first", extra={"group": "ab12", "round": 3, "ratio": 0.5, "ok": True})
    log.warning("second %s", "arg", extra={"key": b"\x00\x10", "level": "clash", "x": float("nan")})
    records = _json_lines(out)
    assert len(records) == 2
    first, second = records
    assert first["level"] == "DEBUG"
    assert first["logger"] == "p2pfed.test"
    assert first["msg"] == "first"
    assert (first["group"], first["round"], first["ratio"], first["ok"]) == ("ab12", 3, 0.5, True)
    assert list(first)[:4] == ["ts", "level", "logger", "msg"]
    ts = first["ts"]
    assert isinstance(ts, str) and ts.endswith("Z")
    parsed = datetime.datetime.fromisoformat(ts)
    assert parsed.utcoffset() == datetime.timedelta(0)
    assert second["msg"] == "second arg"
    assert second["level"] == "WARNING"
    assert second["key"] == "0010"
    assert second["extra.level"] == "clash"  # fixed keys are never overwritten
    assert second["x"] == "nan"  # strict JSON has no NaN


def test_exception_is_in_json_record() -> None:
    out = io.StringIO()
    setup_logging("json", "INFO", out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("p2pfed.test").exception("failed")
    (record,) = _json_lines(out)
    assert record["msg"] == "failed"
    assert isinstance(record["exc"], str)
    assert "RuntimeError: boom" in record["exc"]


def test_exception_in_text_is_indented_below_the_line() -> None:
    out = io.StringIO()
    setup_logging("text", "INFO", out)
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("p2pfed.test").exception("failed")
    first, *rest = out.getvalue().splitlines()
    assert TEXT_LINE.fullmatch(first)
    assert rest and all(line.startswith("    ") for line in rest)
    assert rest[-1].strip() == "ValueError: bad"


def test_setup_twice_does_not_duplicate_lines() -> None:
    old, out = io.StringIO(), io.StringIO()
    setup_logging("text", "INFO", old)
    setup_logging("json", "INFO", out)
    setup_logging("json", "INFO", out)
    logging.getLogger("p2pfed.test").info("once")
    assert old.getvalue() == ""
    assert [r["msg"] for r in _json_lines(out)] == ["once"]


def test_level_filters_records() -> None:
    out = io.StringIO()
    setup_logging("json", "warning", out)
    log = logging.getLogger("p2pfed.test")
    log.info("hidden")
    log.warning("shown")
    log.error("shown too")
    assert [r["msg"] for r in _json_lines(out)] == ["shown", "shown too"]


def test_peer_strings_cannot_forge_lines() -> None:
    out = io.StringIO()
    setup_logging("text", "INFO", out)
    evil = "x\n2026-01-01 00:00:00.000 ERROR p2pfed.node: forged\u2028"
    logging.getLogger("p2pfed.test").info("peer said %s", evil, extra={"addr": evil})
    assert len(out.getvalue().splitlines()) == 1
    assert "\\n2026-01-01" in out.getvalue()

    out = io.StringIO()
    setup_logging("json", "INFO", out)
    logging.getLogger("p2pfed.test").info("peer said %s", evil, extra={"addr": evil})
    (record,) = _json_lines(out)
    assert record["msg"] == f"peer said {evil}"
    assert record["addr"] == evil


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="log format"):
        setup_logging("xml", "INFO", io.StringIO())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="log level"):
        setup_logging("text", "LOUD", io.StringIO())
