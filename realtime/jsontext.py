"""JSON text on the hot paths: orjson where it gives the standard library's result, the
standard library where it does not.

Every publication is parsed from JSON at least once and written as JSON at least twice (its
size check, its event; an API publish also its answer): with the standard library, JSON was
~15% of a node's samples per publication in batches (py-spy; bench/RESULTS.md, issue 12).
orjson (a compiled, widely used library) encodes small values about ten times and parses them
about four times faster. Its results differ from the standard library's on a few inputs,
which therefore take the standard library's path, so that what a client sends, gets back and
is refused stays what it was:

* :func:`dumps` writes ASCII only (``\\uXXXX`` escapes), as Flask, python-socketio and the
  standard library do: text that orjson would write with other characters is written by the
  standard library. Integers past 64 bits, non-string keys and lone surrogates, which orjson
  refuses, are written by the standard library. Three differences remain: small floats may be
  written in another (equal) notation (``1e-7`` for ``1e-07``); NaN and the infinities, which
  JSON has not, are written ``null`` (never ``NaN``, which browsers refuse); and datetimes,
  UUIDs, dataclasses and enums are written (as orjson writes them) instead of refused. Neither
  of the last two reaches a client: publication data is checked first
  (:func:`realtime.payloads.check_publication_data`), and the rest is realtime's own values.
* :func:`loads` gives the standard library's values: text with an integer of 20 digits or more
  (which orjson reads as a float, losing digits) and anything orjson refuses (NaN, lone
  surrogates, text that is not UTF-8, deep nesting) are parsed by the ``fallback`` the caller
  names, which also decides what is refused and with which error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson

# json.dumps with any option builds a new JSONEncoder per call: the fallback is built once.
_COMPACT = json.JSONEncoder(separators=(",", ":"))

# Digits to "0", everything else to " ": a run of 20 zeros after translating marks an integer
# (or a float's digits) of 20 digits or more, found at C speed without a regular expression
# (which cost more than the parse it guards).
_DIGITS_TO_ZERO = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_LONG_NUMBER = b"0" * 20


def dumps(value: Any) -> str:
    """Compact, ASCII-escaped JSON text of ``value``; TypeError or ValueError when it is not
    JSON (as ``json.dumps``)."""
    try:
        encoded = orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return _COMPACT.encode(value)
    # The standard library also escapes DEL, which is ASCII.
    if encoded.isascii() and b"\x7f" not in encoded:
        return encoded.decode("ascii")
    return _COMPACT.encode(value)


def dumps_utf8(value: Any) -> bytes:
    """Compact JSON of ``value`` as UTF-8 bytes, non-ASCII characters unescaped, or raise as
    the standard library's ``ensure_ascii=False, allow_nan=False`` encoder does.

    For measuring and checking data; see :func:`realtime.payloads.check_publication_data`.
    """
    try:
        encoded = orjson.dumps(value)
    except TypeError:
        return _CHECKING.encode(value).encode()
    # orjson writes NaN and the infinities as null: where null appears, ask the standard
    # library, which refuses them (a null in the data, or in a string, only costs that).
    if b"null" in encoded:
        return _CHECKING.encode(value).encode()
    return encoded


_CHECKING = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def loads(text: str | bytes, fallback: Callable[[Any], Any] = json.loads) -> Any:
    """The value of JSON ``text``, as ``fallback(text)`` would give it (see the module)."""
    raw = text.encode(errors="surrogatepass") if isinstance(text, str) else text
    if raw.translate(_DIGITS_TO_ZERO).find(_LONG_NUMBER) == -1:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return fallback(text)
