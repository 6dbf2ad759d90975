"""The node's HTTP server pieces: the request-header reader pywsgi's handler uses."""

from __future__ import annotations

import io

import pytest

from realtime.server import MAX_HEADERS, RequestHeaders


def headers(raw: bytes) -> RequestHeaders:
    return RequestHeaders(io.BytesIO(raw))


def test_headers_are_read_up_to_the_blank_line_and_looked_up_in_any_case():
    parsed = headers(b"Host: a:1\r\nContent-Type: text/plain\r\nX-Two: 1\r\nx-two: 2\r\n\r\n"
                     b"body")
    assert parsed.status == ""
    assert parsed.get("host") == "a:1" and parsed.getheader("HOST") == "a:1"
    assert parsed.typeheader == "text/plain"
    assert parsed.get("x-two") == "1"  # the first one, as the email parser answers
    assert parsed.get("missing", "default") == "default"
    # the raw lines, every one, for the WSGI environ
    assert parsed.headers == ["Host: a:1\r\n", "Content-Type: text/plain\r\n", "X-Two: 1\r\n",
                              "x-two: 2\r\n"]


def test_a_deleted_header_is_gone():
    parsed = headers(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
    del parsed["content-length"]
    assert parsed.get("Content-Length") is None


def test_the_end_of_input_ends_the_headers():
    assert headers(b"Host: a\r\n").get("host") == "a"


@pytest.mark.parametrize("raw,problem", [
    (b"Host: a\r\n folded: line\r\n\r\n", "Malformed"),
    (b"no colon here\r\n\r\n", "Malformed"),
    (b": no name\r\n\r\n", "Malformed"),
    (b"Bad Name : x\r\n\r\n", "Malformed"),
    (b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n", "Conflicting"),
    (b"X: " + b"y" * 70000 + b"\r\n\r\n", "too long"),
    (b"".join(b"H%d: v\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n", "More than"),
])
def test_malformed_header_sections_make_the_request_invalid(raw, problem):
    assert problem in headers(raw).status


def test_a_repeated_content_length_with_the_same_value_is_fine():
    assert headers(b"Content-Length: 5\r\ncontent-length: 5\r\n\r\n").status == ""
