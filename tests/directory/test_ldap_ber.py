"""The pre-encoded LDAP requests are the bytes ldap3 itself would send.

Unit tests: lengths, integers and binds against ldap3's own pyasn1 encoding,
for any message id, DN and password (hypothesis). The search template is
checked on the wire against a real slapd in test_ldap_wire.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ldap3 import SIMPLE
from ldap3.core.exceptions import LDAPException
from ldap3.operation.bind import bind_operation
from ldap3.protocol.rfc4511 import LDAPMessage, MessageID, ProtocolOp
from ldap3.protocol.sasl.sasl import validate_simple_password
from ldap3.utils.asn1 import encode as ldap3_encode
from pyasn1.codec.ber import encoder
from pyasn1.type import univ

from mailhub.directory.ldap_wire import ber

MESSAGE_IDS = st.integers(min_value=1, max_value=2**31 - 1)
TEXT = st.text(min_size=1, max_size=80)


def ldap3_bind(message_id: int, dn: str, password: str) -> bytes:
    """What ldap3's Connection.bind sends (strategy.send + sending, no controls)."""
    message = LDAPMessage()
    message["messageID"] = MessageID(message_id)
    message["protocolOp"] = ProtocolOp().setComponentByName(
        "bindRequest", bind_operation(3, SIMPLE, dn, password, auto_encode=True))
    return bytes(ldap3_encode(message))


@given(st.integers(min_value=0, max_value=2**40))
def test_integers_and_lengths_are_encoded_as_pyasn1_does(n: int) -> None:
    assert ber.tlv(ber.INTEGER, ber.integer(n)) == encoder.encode(univ.Integer(n))
    content = b"x" * (n % 70000)
    assert ber.tlv(ber.OCTET_STRING, content) == encoder.encode(univ.OctetString(content))


@settings(max_examples=300)
@given(MESSAGE_IDS, TEXT, TEXT)
def test_a_bind_is_the_bytes_ldap3_sends(message_id: int, dn: str, password: str) -> None:
    try:
        expected = ldap3_bind(message_id, dn, password)
    except (LDAPException, UnicodeError):
        # ldap3 refuses it (SASLprep, unencodable): so does the fast path.
        with pytest.raises((LDAPException, UnicodeError)):
            ber.bind_message(message_id, dn, ber.simple_password(password))
        return
    assert ber.bind_message(message_id, dn, ber.simple_password(password)) == expected


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1))
def test_printable_ascii_passwords_skip_saslprep_because_it_leaves_them_alone(
        password: str) -> None:
    assert ber.simple_password(password) == validate_simple_password(password)


@pytest.mark.parametrize("password,prepared", [
    ("Pässwörd zoë", "Pässwörd zoë".encode()),
    ("a\u00a0b", b"a b"),            # non-ASCII space becomes a space
    ("x\u00ady", b"xy"),             # soft hyphen is mapped to nothing
    ("\u2168", b"IX"),               # NFKC
])
def test_other_passwords_go_through_ldap3s_saslprep(password: str, prepared: bytes) -> None:
    assert ber.simple_password(password) == prepared


def test_passwords_saslprep_forbids_are_refused() -> None:
    with pytest.raises(LDAPException):
        ber.simple_password("control\x01char")


@given(st.recursive(
    st.tuples(st.sampled_from([0x04, 0x02, 0x80, 0x87]), st.binary(max_size=300)),
    lambda children: st.tuples(st.sampled_from([0x30, 0x31, 0x63, 0xA0, 0xA1]),
                               st.lists(children, max_size=4)),
    max_leaves=12))
def test_node_trees_survive_encoding_and_decoding(node: ber.Node) -> None:
    node = _listify(node)
    assert ber.decode(ber.encode(node)) == node


def _listify(node: ber.Node) -> ber.Node:
    tag, content = node
    if isinstance(content, list):
        return tag, [_listify(child) for child in content]
    return tag, content


@pytest.mark.parametrize("data", [b"", b"\x30", b"\x30\x05\x02\x01", b"\x04\x01ab",
                                  b"\x30\x80\x00\x00", b"\x1f\x01\x00", b"\x04\x84\xff\xff\xff\xff"])
def test_malformed_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(ber.BERError):
        ber.decode(data)


def test_a_template_without_the_marker_or_not_a_search_is_refused() -> None:
    search = ber.encode((0x30, [(0x02, b"\x01"), (0x63, [(0x04, b"dc=x")])]))
    with pytest.raises(ber.BERError):
        ber.SearchTemplate(search, "marker", 1)
    bind = ber.bind_message(1, "marker", b"pw")
    with pytest.raises(ber.BERError):
        ber.SearchTemplate(bind, "marker", 1)
    long_form = b"\x30\x81\x03\x02\x01\x01"   # a length not in its shortest form
    with pytest.raises(ber.BERError):
        ber.SearchTemplate(long_form, "marker", 1)


def test_a_template_puts_the_login_where_the_marker_was() -> None:
    search = ber.encode((0x30, [(0x02, b"\x05"), (0x63, [
        (0x04, b"dc=x"), (0xA3, [(0x04, b"uid"), (0x04, b"pre-MARK-post")])])]))
    template = ber.SearchTemplate(search, "MARK", 1)
    assert template.message(5, "MARK") == search
    assert template.message(300, "zoë") == ber.encode((0x30, [(0x02, b"\x01\x2c"), (0x63, [
        (0x04, b"dc=x"), (0xA3, [(0x04, b"uid"), (0x04, "pre-zoë-post".encode())])])]))
