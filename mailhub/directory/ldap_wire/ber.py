"""The two LDAP requests of every login, encoded without pyasn1.

Profiling MailStore ``cmd=auth`` showed that most of mailhub's own CPU per
login went to ldap3 building and BER-encoding its two requests with pyasn1
(the search for the entry, then the bind as it): more than reading the
answers, and more than the whole HTTP side. Both requests are fixed in
shape, so they are encoded here directly, and sent and answered through
ldap3's own connection (socket, message ids, TLS, response decoding):

- the **search** is a template: ldap3 encodes it once, for a marker login,
  on a real connection (:class:`Recorder` keeps the bytes it sends); the
  template is split into BER nodes, and each login gets a copy with the
  marker replaced by the login's UTF-8 bytes and a new message id. That is
  exactly what ldap3 itself sends for that login, because mailhub escapes
  the login (RFC 4515) before ldap3 parses the filter, so the assertion
  values ldap3 encodes are the login's characters as UTF-8, whatever the
  filter around them;
- the **bind** is a simple bind (version 3, DN, password), with the
  password prepared by ldap3's own SASLprep (RFC 4013) unless it is plain
  printable ASCII, which SASLprep leaves as it is.

The tests compare these bytes with what ldap3 puts on the wire, for any
login and password (hypothesis), so the fast path is the same protocol,
only cheaper to produce. When the template cannot be made (a filter
without ``{login}``, bytes this module does not parse back identically),
:class:`LDAPClient <mailhub.directory.ldap.LDAPClient>` keeps using
ldap3's own path.
"""

from __future__ import annotations

from typing import Any, Union

from ldap3.protocol.sasl.sasl import validate_simple_password

#: A BER node: (tag byte, content bytes) for a primitive, (tag byte, children) for constructed.
Node = tuple[int, Union[bytes, list["Node"]]]

CONSTRUCTED = 0x20
SEQUENCE = 0x30
INTEGER = 0x02
OCTET_STRING = 0x04
BIND_REQUEST = 0x60      # [APPLICATION 0], constructed
SEARCH_REQUEST = 0x63    # [APPLICATION 3], constructed
SIMPLE = 0x80            # [0] primitive: AuthenticationChoice simple
#: Printable ASCII, which SASLprep maps to itself (no mapping, NFKC-stable,
#: nothing prohibited, no bidirectional characters).
_PRINTABLE_ASCII = frozenset(range(0x20, 0x7F))


class BERError(ValueError):
    """Bytes this module cannot take apart (so the fast path is not used)."""


def length(n: int) -> bytes:
    """A definite BER length in its shortest form (as pyasn1 writes it)."""
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def integer(n: int) -> bytes:
    """The content octets of a non-negative INTEGER, shortest two's complement."""
    return n.to_bytes(n.bit_length() // 8 + 1, "big")


def tlv(tag: int, content: bytes) -> bytes:
    """One encoded node."""
    return bytes((tag,)) + length(len(content)) + content


def encode(node: Node) -> bytes:
    """The bytes of a node tree."""
    tag, content = node
    if isinstance(content, list):
        return tlv(tag, b"".join(encode(child) for child in content))
    return tlv(tag, content)


def decode(data: bytes) -> Node:
    """The node tree of one encoded element that fills ``data`` exactly."""
    node, end = _decode_at(data, 0)
    if end != len(data):
        raise BERError("trailing bytes after the element")
    return node


def _decode_at(data: bytes, at: int) -> tuple[Node, int]:
    if at + 2 > len(data):
        raise BERError("truncated element")
    tag = data[at]
    if tag & 0x1F == 0x1F:
        raise BERError("multi-byte tags are not used by these requests")
    first = data[at + 1]
    at += 2
    if first < 0x80:
        size = first
    else:
        count = first & 0x7F
        if count == 0 or at + count > len(data):
            raise BERError("indefinite or truncated length")
        size = int.from_bytes(data[at:at + count], "big")
        at += count
    end = at + size
    if end > len(data):
        raise BERError("truncated content")
    if not tag & CONSTRUCTED:
        return (tag, data[at:end]), end
    children: list[Node] = []
    while at < end:
        child, at = _decode_at(data, at)
        children.append(child)
    if at != end:
        raise BERError("children overrun their parent")
    return (tag, children), end


class SearchTemplate:
    """One search request, encoded by ldap3 for a marker login, reusable for any login."""

    def __init__(self, recorded: bytes, marker: str, expected: int) -> None:
        """``recorded``: ldap3's LDAPMessage for the marker; ``expected``: ``{login}`` count.

        Raises BERError unless the bytes parse back to themselves, hold one
        search request, and the marker appears exactly ``expected`` times,
        each inside one primitive value.
        """
        message = decode(recorded)
        if encode(message) != recorded:
            raise BERError("ldap3's encoding is not the shortest form")
        tag, children = message
        if (tag != SEQUENCE or not isinstance(children, list) or len(children) != 2
                or children[0][0] != INTEGER or children[1][0] != SEARCH_REQUEST):
            raise BERError("not a plain search request message")
        self._marker = marker.encode("utf-8")
        self._request = children[1]
        found = _count(self._request, self._marker)
        if expected < 1 or found != expected:
            raise BERError("the login appears %d times in the encoded filter, %d expected"
                           % (found, expected))

    def message(self, message_id: int, login: str) -> bytes:
        """The LDAPMessage searching for ``login`` (UnicodeEncodeError if it has no UTF-8)."""
        value = login.encode("utf-8")
        body = encode((INTEGER, integer(message_id))) + encode(
            _substitute(self._request, self._marker, value))
        return tlv(SEQUENCE, body)


def _count(node: Node, marker: bytes) -> int:
    tag, content = node
    if isinstance(content, list):
        return sum(_count(child, marker) for child in content)
    return content.count(marker)


def _substitute(node: Node, marker: bytes, value: bytes) -> Node:
    tag, content = node
    if isinstance(content, list):
        return tag, [_substitute(child, marker, value) for child in content]
    if marker in content:
        return tag, content.replace(marker, value)
    return node


def simple_password(password: str) -> bytes:
    """The password octets ldap3 sends in a simple bind (after SASLprep)."""
    raw = password.encode("utf-8", "surrogatepass")
    if _PRINTABLE_ASCII.issuperset(raw):
        return raw
    prepared: Any = validate_simple_password(password)
    return prepared if isinstance(prepared, bytes) else prepared.encode("utf-8")


def bind_message(message_id: int, dn: str, password: bytes) -> bytes:
    """The LDAPMessage of a version 3 simple bind as ``dn``.

    ``password`` is the octets from :func:`simple_password`.
    """
    request = (tlv(INTEGER, integer(3)) + tlv(OCTET_STRING, dn.encode("utf-8"))
               + tlv(SIMPLE, password))
    return tlv(SEQUENCE, tlv(INTEGER, integer(message_id)) + tlv(BIND_REQUEST, request))


class Recorder:
    """Wraps a connection's socket and keeps what is sent through it."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.sent: list[bytes] = []

    def sendall(self, data: bytes, *args: Any) -> Any:
        self.sent.append(bytes(data))
        return self._sock.sendall(data, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
