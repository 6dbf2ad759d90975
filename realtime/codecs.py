"""Socket.IO v5 packet codecs: the default JSON parser and ``socket.io-msgpack-parser``.

A codec turns a Socket.IO :class:`Packet` into the payload of one Engine.IO message and back:
text (``str``) for JSON, binary (``bytes``) for msgpack. A session picks its codec from the
first packet its client sends (the CONNECT): text means the official client's default parser,
binary means ``socket.io-msgpack-parser``. Both kinds of clients share a node and its channels;
each publication is encoded once per codec (see :mod:`realtime.frames`).

Decoding is strict and never raises anything but :class:`PacketError`, whose ``close_code`` is
the WebSocket close code that fits. Encoding follows what the official JavaScript parsers
accept, in particular ``socket.io-msgpack-parser``'s checks: ``id`` absent rather than ``nil``,
no ``data`` on DISCONNECT, an object on CONNECT, an array on EVENT and ACK.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
from typing import Any, Final

import msgpack

from .jsontext import dumps, loads
from .transports.framing import CLOSE_BAD_DATA, CLOSE_PROTOCOL_ERROR, CLOSE_UNSUPPORTED_DATA

# The one namespace realtime serves. Clients connect to it; CONNECTs to any other are refused.
NAMESPACE: Final = "/"

# Ack ids are counters on the client (JavaScript numbers): anything longer is not one.
MAX_ACK_ID_DIGITS: Final = 15
# Binary attachments a JSON client may announce for one packet (realtime refuses them anyway,
# once they arrived, with an error ack).
MAX_ATTACHMENTS: Final = 64


class PacketType(enum.IntEnum):
    CONNECT = 0
    DISCONNECT = 1
    EVENT = 2
    ACK = 3
    CONNECT_ERROR = 4
    BINARY_EVENT = 5
    BINARY_ACK = 6


@dataclasses.dataclass(slots=True)
class Packet:
    """One Socket.IO packet. ``attachments`` counts a JSON binary packet's attachments."""

    type: PacketType
    namespace: str = NAMESPACE
    data: Any = None
    ack_id: int | None = None
    attachments: int = 0


class PacketError(ValueError):
    """A message that is not a valid Socket.IO packet for the session's codec."""

    def __init__(self, message: str, close_code: int = CLOSE_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.close_code = close_code


class Codec:
    """Encodes and decodes the Socket.IO packets of one wire format."""

    name: str = ""
    #: position of this codec in per-codec caches (see :class:`realtime.frames.EncodedEvent`)
    index: int = 0
    #: the type of the Engine.IO messages this codec's packets travel in
    message_type: type = str

    def encode(self, packet: Packet) -> str | bytes:
        """The Engine.IO message payload carrying ``packet``."""
        raise NotImplementedError

    def encode_event(self, name: str, payload: Any) -> str | bytes:
        """An EVENT for the namespace, without ack id: what the fan-out sends."""
        return self.encode(Packet(PacketType.EVENT, data=[name, payload]))

    def decode(self, message: str | bytes) -> Packet:
        """Parse one Engine.IO message payload; raise :class:`PacketError` when invalid."""
        raise NotImplementedError


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class JsonCodec(Codec):
    """The official client's default parser: ``<type>[<n>-][<nsp>,][<id>][<json>]`` as text.

    Decoding refuses what strict JSON refuses (``NaN``, ``Infinity``), which Python's ``json``
    would otherwise accept and later write back for browsers to choke on.
    """

    name = "json"
    index = 0
    message_type = str

    def __init__(self) -> None:
        self._decoder = json.JSONDecoder(parse_constant=_refuse_constant)

    def encode(self, packet: Packet) -> str:
        text = str(int(packet.type))
        if packet.type in (PacketType.BINARY_EVENT, PacketType.BINARY_ACK):
            text += f"{packet.attachments}-"
        if packet.namespace != NAMESPACE:
            text += packet.namespace + ","
        if packet.ack_id is not None:
            text += str(packet.ack_id)
        if packet.data is not None:
            text += dumps(packet.data)
        return text

    def encode_event(self, name: str, payload: Any) -> str:
        # What encode() gives for an EVENT of the default namespace without ack id, without
        # building the Packet: the fan-out encodes every publication through here.
        return "2" + dumps([name, payload])

    def decode(self, message: str | bytes) -> Packet:
        if not isinstance(message, str):
            raise PacketError("binary message in a JSON session", CLOSE_UNSUPPORTED_DATA)
        if not message or message[0] not in "0123456":
            raise PacketError(f"unknown Socket.IO packet type {message[:1]!r}")
        kind = PacketType(int(message[0]))
        index, end = 1, len(message)
        attachments = 0
        if kind in (PacketType.BINARY_EVENT, PacketType.BINARY_ACK):
            dash = message.find("-", index, index + 4)
            count = message[index:dash]
            # ASCII digits only: str.isdigit() also admits "²", which int() refuses.
            if dash == -1 or not (count.isascii() and count.isdigit()):
                raise PacketError("binary packet without an attachment count")
            attachments, index = int(message[index:dash]), dash + 1
            if not 0 < attachments <= MAX_ATTACHMENTS:
                raise PacketError(f"binary packet with {attachments} attachments")
        namespace = NAMESPACE
        if index < end and message[index] == "/":
            comma = message.find(",", index)
            if comma == -1:
                namespace, index = message[index:], end
            else:
                namespace, index = message[index:comma], comma + 1
        digits = index
        while digits < end and "0" <= message[digits] <= "9":
            digits += 1
        ack_id = None
        if digits > index:
            if digits - index > MAX_ACK_ID_DIGITS:
                raise PacketError("ack id is too long")
            ack_id = int(message[index:digits])
        data = None
        if digits < end:
            try:
                data = loads(message[digits:], self._decoder.decode)
            except RecursionError:
                raise PacketError("packet data is nested too deeply") from None
            except ValueError as exc:
                raise PacketError(f"packet data is not JSON: {exc}") from None
        return Packet(kind, namespace, data, ack_id, attachments)


# socket.io-msgpack-parser (through notepack.io) sends `undefined` as the fixext 1 of type 0
# with one zero byte, and a Date as the fixext 8 of type 0: milliseconds since the epoch.
_EXT_JS = 0


def _decode_ext(code: int, data: bytes) -> Any:
    if code == _EXT_JS and data == b"\x00":
        return None  # undefined: JSON has no such value; an absent field reads the same
    if code == _EXT_JS and len(data) == 8:
        high, low = int.from_bytes(data[:4], "big", signed=True), int.from_bytes(data[4:], "big")
        try:
            moment = _EPOCH + datetime.timedelta(milliseconds=high * (1 << 32) + low)
        except OverflowError:
            return msgpack.ExtType(code, data)
        # What JSON.stringify makes of a Date, so both kinds of clients see the same value.
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    # Anything else (an ArrayBuffer, an unknown type) is kept as is: it is not a JSON value,
    # so an event carrying it is answered with bad_request, as binary data is for JSON clients.
    return msgpack.ExtType(code, data)


_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


class MsgpackCodec(Codec):
    """``socket.io-msgpack-parser``: each packet is one msgpack map ``{type, nsp, data, id}``.

    Other keys (the official client adds ``options``) are ignored.
    """

    name = "msgpack"
    index = 1
    message_type = bytes

    def encode(self, packet: Packet) -> bytes:
        # The JS parser throws on `id: nil`, on any `data` with DISCONNECT, and on CONNECT data
        # that is not an object: absent fields stay absent.
        fields: dict[str, Any] = {"type": int(packet.type), "nsp": packet.namespace}
        if packet.type is not PacketType.DISCONNECT and packet.data is not None:
            fields["data"] = packet.data
        if packet.ack_id is not None:
            fields["id"] = packet.ack_id
        return msgpack.packb(fields, use_bin_type=True)

    def decode(self, message: str | bytes) -> Packet:
        if not isinstance(message, bytes | bytearray):
            raise PacketError("text message in a msgpack session", CLOSE_UNSUPPORTED_DATA)
        try:
            fields = msgpack.unpackb(message, ext_hook=_decode_ext, raw=False,
                                     strict_map_key=True)
        except UnicodeDecodeError:
            raise PacketError("msgpack string is not UTF-8", CLOSE_BAD_DATA) from None
        except (ValueError, TypeError, OverflowError, RecursionError,
                msgpack.UnpackException) as exc:
            raise PacketError(f"not a msgpack packet: {type(exc).__name__}") from None
        if not isinstance(fields, dict):
            raise PacketError("msgpack packet is not a map")
        kind = fields.get("type")
        if not isinstance(kind, int) or isinstance(kind, bool) \
                or not PacketType.CONNECT <= kind <= PacketType.CONNECT_ERROR:
            raise PacketError(f"unknown Socket.IO packet type {kind!r}")
        namespace = fields.get("nsp")
        if namespace is None:
            namespace = NAMESPACE
        elif not isinstance(namespace, str) or not namespace.startswith("/"):
            raise PacketError("packet namespace is not a string starting with /")
        ack_id = fields.get("id")
        if ack_id is not None and (not isinstance(ack_id, int) or isinstance(ack_id, bool)
                                   or not 0 <= ack_id < 10 ** MAX_ACK_ID_DIGITS):
            raise PacketError("ack id is not a non-negative integer")
        return Packet(PacketType(kind), namespace, fields.get("data"), ack_id)


JSON: Final = JsonCodec()
MSGPACK: Final = MsgpackCodec()
CODECS: Final[tuple[Codec, ...]] = (JSON, MSGPACK)


def codec_for(message: str | bytes) -> Codec:
    """The codec a client uses, from the first Socket.IO message it sends."""
    return JSON if isinstance(message, str) else MSGPACK
