"""Frame coding that txamqp gets wrong for messages written by other clients.

txamqp 0.8 decodes message bodies "opportunistically" as UTF-8 text, which
breaks a body that spans several frames with a character cut at the border,
and its field tables know only a few types (S, I, F, t): a message whose
headers carry a 64-bit integer, a float, bytes or an array (as pika, amqplib,
Java clients or RabbitMQ itself write) cannot even be decoded, and the error
takes the whole connection down -- again on every redelivery. Message
headers and bodies are the only part of the protocol that third parties
write, so mailhub decodes body and header frames itself, with every field
type of AMQP 0-9-1 as RabbitMQ uses it, and encodes header frames the same
way so dead-lettered messages keep their headers.

Quarantine: this module is the only AMQP codec in mailhub besides txamqp's,
and only :mod:`mailhub.pubsub.connection` uses it (``_Client._unpack_frame``
and ``_pack_frame``); nothing else may import it. It exists for measured
reasons (the cases above broke real connections; tests/pubsub/test_frames.py
pins each one). Remove it, and those hooks, when txamqp decodes such frames
itself: the tests say when.
"""

from __future__ import annotations

from decimal import Decimal
from io import BytesIO
from typing import Any

from txamqp.codec import Codec
from txamqp.connection import Body, Frame, Header


class Timestamp(int):
    """A table value of type T (seconds since the epoch), kept as such when re-encoded."""


class FullCodec(Codec):
    """txamqp's Codec with complete field tables."""

    def decode_table(self) -> dict[str, Any]:
        size = self.decode_long()
        start = self.nread
        table = {}
        while self.nread - start < size:
            key = self.decode_shortstr()
            table[key] = self._decode_value()
        return table

    def _decode_array(self) -> list[Any]:
        size = self.decode_long()
        start = self.nread
        values = []
        while self.nread - start < size:
            values.append(self._decode_value())
        return values

    def _decode_value(self) -> Any:
        kind = self.read(1)
        if kind == b"S":
            data = self.decode_longbytes()
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                return data
        if kind == b"t":
            return self.decode_octet() != 0
        if kind in _NUMBERS:
            return self.unpack(_NUMBERS[kind])
        if kind == b"T":
            return Timestamp(self.unpack("!Q"))
        if kind == b"D":
            scale = self.decode_octet()
            return Decimal(self.unpack("!i")).scaleb(-scale)
        if kind == b"x":
            return self.decode_longbytes()
        if kind == b"F":
            return self.decode_table()
        if kind == b"A":
            return self._decode_array()
        if kind == b"V":
            return None
        raise ValueError("unknown AMQP field type %r" % (kind,))

    def encode_table(self, table: dict[str, Any]) -> None:
        inner = FullCodec(BytesIO())
        for key, value in table.items():
            inner.encode_shortstr(key)
            inner._encode_value(value)
        data = inner.stream.getvalue()
        self.encode_long(len(data))
        self.write(data)

    def _encode_value(self, value: Any) -> None:
        if isinstance(value, bool):
            self.write(b"t")
            self.encode_octet(1 if value else 0)
        elif isinstance(value, Timestamp):
            self.write(b"T")
            self.pack("!Q", value)
        elif isinstance(value, int):
            if -2 ** 31 <= value < 2 ** 31:
                self.write(b"I")
                self.pack("!i", value)
            else:
                self.write(b"l")
                self.pack("!q", value)
        elif isinstance(value, float):
            self.write(b"d")
            self.pack("!d", value)
        elif isinstance(value, Decimal):
            sign, digits, exponent = value.as_tuple()
            scale = max(0, -int(exponent))
            self.write(b"D")
            self.encode_octet(scale)
            self.pack("!i", int(value.scaleb(scale)))
        elif isinstance(value, str):
            self.write(b"S")
            self.enc_bytes("!L", value.encode("utf-8"))
        elif isinstance(value, (bytes, bytearray)):
            self.write(b"x")
            self.enc_bytes("!L", bytes(value))
        elif isinstance(value, dict):
            self.write(b"F")
            self.encode_table(value)
        elif isinstance(value, (list, tuple)):
            inner = FullCodec(BytesIO())
            for item in value:
                inner._encode_value(item)
            data = inner.stream.getvalue()
            self.write(b"A")
            self.encode_long(len(data))
            self.write(data)
        elif value is None:
            self.write(b"V")
        else:
            raise TypeError("cannot put %r in an AMQP table" % (value,))


_NUMBERS = {b"b": "!b", b"B": "!B", b"s": "!h", b"u": "!H", b"I": "!i", b"i": "!I",
            b"l": "!q", b"L": "!Q", b"f": "!f", b"d": "!d"}


def decode_header(spec: Any, dec: Codec) -> Header:
    """A content header frame's payload, properties decoded with :class:`FullCodec`."""
    c = FullCodec(BytesIO(dec.decode_longbytes()))
    klass = spec.classes.byid[c.decode_short()]
    weight = c.decode_short()
    size = c.decode_longlong()
    bits = []
    while True:
        flags = c.decode_short()
        for i in range(15, 0, -1):
            bits.append(flags >> i & 0x1 != 0)
        if flags & 0x1 == 0:
            break
    properties = {}
    for present, field in zip(bits, klass.fields):
        if present:
            properties[str(field.name)] = c.decode(field.type)
    return Header(klass, weight, size, **properties)


def encode_header(header: Header, enc: Codec) -> None:
    """Write a content header frame's payload, properties encoded with :class:`FullCodec`."""
    c = FullCodec(BytesIO())
    c.encode_short(header.klass.id)
    c.encode_short(header.weight)
    c.encode_longlong(header.size)
    fields = header.klass.fields.items
    flags = 0
    for i, field in enumerate(fields):
        # Fifteen property bits per 16-bit word; the last bit says "more".
        if i > 0 and i % 15 == 0:
            c.encode_short(flags | 1)
            flags = 0
        if header.properties.get(field.name) is not None:
            flags |= 1 << (15 - i % 15)
    c.encode_short(flags)
    for field in fields:
        value = header.properties.get(field.name)
        if value is not None:
            c.encode(field.type, value)
    c.flush()
    enc.encode_longbytes(c.stream.getvalue())


def encode_method(method: Any, enc: Codec) -> None:
    """Write a method frame's payload, tables (client properties) with :class:`FullCodec`."""
    c = FullCodec(BytesIO())
    c.encode_short(method.method.klass.id)
    c.encode_short(method.method.id)
    for field, arg in zip(method.method.fields, method.args):
        c.encode(field.type, arg)
    c.flush()
    enc.encode_longbytes(c.stream.getvalue())


def unpack_frame(spec: Any, frame_end: int, data: bytes) -> Frame:
    """Decode one frame: bodies as bytes, headers with full tables, the rest as txamqp does."""
    from txamqp.spec import pythonize

    c = FullCodec(BytesIO(data))
    frame_type = pythonize(spec.constants.byid[c.decode_octet()].name)
    channel = c.decode_short()
    if frame_type == Frame.BODY:
        payload: Any = Body(c.decode_longbytes())
    elif frame_type == Frame.HEADER:
        payload = decode_header(spec, c)
    else:
        payload = Frame.DECODERS[frame_type].decode(spec, c)
    end = c.decode_octet()
    if end != frame_end:
        raise ValueError("frame error: expected %r, got %r" % (frame_end, end))
    return Frame(channel, payload)


def pack_frame(spec: Any, frame_end: int, frame: Frame) -> bytes:
    """Encode one frame; header and method frames with full tables."""
    c = FullCodec(BytesIO())
    c.encode_octet(spec.constants.bypyname[frame.payload.type].id)
    c.encode_short(frame.channel)
    if frame.payload.type == Frame.HEADER:
        encode_header(frame.payload, c)
    elif frame.payload.type == Frame.METHOD:
        encode_method(frame.payload, c)
    else:
        frame.payload.encode(c)
    c.encode_octet(frame_end)
    return c.stream.getvalue()
