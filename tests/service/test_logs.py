"""Log lines a client cannot forge: control characters in what it sent are escaped."""

from __future__ import annotations

import logging

import pytest

from service.middleware import PrintableFormatter, printable
from tests.service.conftest import fake_app

FORGED = "/restore/deblur\n2099-01-01 INFO forged\x1b[2J\u202e\\x0a"


def test_printable_escapes_controls_and_backslashes_so_an_escape_cannot_be_faked():
    assert printable(FORGED) == "/restore/deblur\\x0a2099-01-01 INFO forged\\x1b[2J\\u202e\\\\x0a"
    assert printable("plain /restore/deblur é 漢") == "plain /restore/deblur é 漢"


def test_the_formatter_keeps_each_record_on_one_line_but_tracebacks_whole():
    try:
        raise ValueError("boom")
    except ValueError as e:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "from %s", (FORGED,), (type(e), e, e.__traceback__))
    first, *rest = PrintableFormatter("%(levelname)s %(message)s").format(record).splitlines()
    assert first == "ERROR from /restore/deblur\\x0a2099-01-01 INFO forged\\x1b[2J\\u202e\\x0a"
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: boom"


@pytest.mark.anyio
async def test_the_access_log_escapes_the_decoded_path(caplog):
    caplog.set_level(logging.INFO, "service.access")
    async with fake_app() as (client, _, _):
        forged = "/restore/deblur%0a2099-01-01%20forged%1b[2J"
        r = await client.post(forged, content=b"x", headers={"content-type": "image/png"})
    assert r.status_code == 404
    (message,) = [rec.getMessage() for rec in caplog.records if rec.name == "service.access"]
    assert message.startswith("POST /restore/deblur\\x0a2099-01-01 forged\\x1b[2J 404 ")
