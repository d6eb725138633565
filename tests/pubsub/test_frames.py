"""Frames written by other AMQP clients: every header type, bodies as bytes."""

from __future__ import annotations

from decimal import Decimal
from io import BytesIO
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase
from txamqp.connection import Body, Frame, Header

from mailhub.config import DEFAULT_SPEC
from mailhub.pubsub.connection import load_spec
from mailhub.pubsub.frames import FullCodec, Timestamp, pack_frame, unpack_frame

from tests.pubsub.fakes import require_spec

HEADERS = {
    "text": "été", "flag": True, "off": False, "small": 7, "negative": -3,
    "big": 2 ** 40, "ratio": 0.5, "price": Decimal("12.34"), "raw": b"\xff\x00",
    "when": Timestamp(1700000000), "nested": {"a": [1, "x", None, {"b": True}]},
    "nothing": None,
}


class FrameTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_spec()
        self.spec = load_spec(DEFAULT_SPEC)
        self.end = self.spec.constants.bypyname["frame_end"].id
        self.basic = self.spec.classes.byname["basic"]

    def roundtrip(self, frame: Frame) -> Frame:
        return unpack_frame(self.spec, self.end, pack_frame(self.spec, self.end, frame))

    def test_every_table_type_survives_a_round_trip(self) -> None:
        header = Header(self.basic, 0, 10, **{"headers": HEADERS, "delivery-mode": 2,
                                              "content-type": "application/json",
                                              "message-id": "m1", "timestamp": 1700000000})
        back = self.roundtrip(Frame(1, header)).payload
        self.assertEqual(back.properties["headers"], HEADERS)
        self.assertIsInstance(back.properties["headers"]["when"], Timestamp)
        self.assertEqual(back.properties["delivery-mode"], 2)
        self.assertEqual(back.properties["content-type"], "application/json")
        self.assertEqual(back.properties["message-id"], "m1")
        self.assertEqual(back.properties["timestamp"], 1700000000)
        self.assertEqual(back.size, 10)

    def test_header_encoding_matches_txamqp_for_what_it_supports(self) -> None:
        header = Header(self.basic, 0, 3, **{"headers": {"k": "v", "n": 1},
                                             "delivery-mode": 2, "priority": 1})
        ours = BytesIO()
        from mailhub.pubsub.frames import encode_header
        encode_header(header, FullCodec(ours))
        theirs = BytesIO()
        from txamqp.codec import Codec
        codec = Codec(theirs)
        header.encode(codec)
        codec.flush()
        self.assertEqual(ours.getvalue(), theirs.getvalue())

    def test_bodies_stay_bytes_even_when_they_look_like_text(self) -> None:
        # A UTF-8 character cut at a frame border: txamqp alone would turn
        # one half into str and the other into bytes, and fail.
        text = "é".encode("utf-8")
        first = self.roundtrip(Frame(1, Body(text[:1]))).payload.content
        second = self.roundtrip(Frame(1, Body(b"plain"))).payload.content
        self.assertEqual((first, second), (text[:1], b"plain"))

    def test_unknown_field_type_is_a_clear_error(self) -> None:
        codec = FullCodec(BytesIO(b"\x00\x00\x00\x03\x01kZ"))
        self.assertRaises(ValueError, codec.decode_table)


class QuarantineTests(SynchronousTestCase):
    def test_only_the_connection_uses_the_frame_codec(self) -> None:
        # frames.py is the one AMQP codec beside txamqp's: it stays behind
        # the connection, so that removing it means touching one module.
        package = Path(__file__).resolve().parents[2] / "mailhub"
        users = sorted(str(path.relative_to(package)) for path in package.rglob("*.py")
                       if path.name != "frames.py" and "pubsub.frames" in path.read_text())
        self.assertEqual(users, ["pubsub/connection.py"])
