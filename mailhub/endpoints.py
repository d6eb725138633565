"""Listen endpoints: Twisted's strings, plus ``reuseport=yes`` on ``tcp:``/``tcp6:``.

``[mailhub] listen`` (and ``--listen``) is a Twisted server endpoint string,
parsed by ``serverFromString``: ``tcp:``, ``ssl:``, ``unix:``, ``systemd:``
(a socket passed by systemd's socket activation)... mailhub adds one option
of its own to ``tcp:`` and ``tcp6:``: ``reuseport=yes`` binds the port with
``SO_REUSEPORT``, so several mailhub processes on one machine can listen on
the same address and port, and the kernel spreads the incoming connections
over them (one process per core; doc/operations.rst, "Scaling out"). Every
process must set it (and run as the same user). The socket is made and bound
here, then handed to the reactor with ``adoptStreamPort``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from zope.interface import implementer

_YES = ("yes", "true", "on", "1")
_NO = ("no", "false", "off", "0")


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """A TCP server endpoint whose socket has ``SO_REUSEPORT`` set."""

    def __init__(self, reactor: Any, port: int, interface: str = "", backlog: int = 50,
                 family: socket.AddressFamily = socket.AF_INET) -> None:
        self._reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog
        self.family = family

    def listen(self, protocolFactory: Any) -> "defer.Deferred[IListeningPort]":
        """Bind, listen and hand the socket to the reactor (a fired Deferred)."""
        return defer.execute(self._listen, protocolFactory)

    def _listen(self, factory: Any) -> IListeningPort:
        host = self.interface or ("::" if self.family == socket.AF_INET6 else "0.0.0.0")
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            # The reactor takes a copy of the descriptor; ours is closed below.
            port: IListeningPort = self._reactor.adoptStreamPort(
                sock.fileno(), self.family, factory)
            return port
        except OSError as e:
            raise CannotListenError(host, self.port, e)
        finally:
            sock.close()


def _split(description: str) -> list[str]:
    """The fields of an endpoint string (``\\:`` escapes a colon, as in Twisted's)."""
    return [field.replace("\\:", ":") for field in re.split(r"(?<!\\):", description)]


def _reuseport(description: str, reactor: Any) -> ReusePortEndpoint | None:
    """The endpoint of a ``tcp:``/``tcp6:`` string with ``reuseport=yes``;
    None when the string does not ask for it; ValueError when it is wrong."""
    fields = _split(description)
    kind = fields[0].lower()
    if kind not in ("tcp", "tcp6"):
        return None
    options: dict[str, str] = {}
    positional: list[str] = []
    for field in fields[1:]:
        key, eq, value = field.partition("=")
        if eq:
            options[key.strip().lower()] = value
        else:
            positional.append(field)
    if "reuseport" not in options:
        return None
    flag = options.pop("reuseport").strip().lower()
    if flag in _NO:
        return None
    if flag not in _YES:
        raise ValueError("reuseport must be yes or no, not %r" % flag)
    if positional:
        options.setdefault("port", positional.pop(0))
    if positional:
        raise ValueError("unexpected field %r" % positional[0])
    unknown = set(options) - {"port", "interface", "backlog"}
    if unknown:
        raise ValueError("unknown option %r with reuseport=yes (port, interface and "
                         "backlog are allowed)" % sorted(unknown)[0])
    if "port" not in options:
        raise ValueError("a port is needed")
    port = int(options["port"])
    backlog = int(options.get("backlog", "50"))
    interface = options.get("interface", "")
    family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
    if interface:
        try:
            if ipaddress.ip_address(interface.split("%")[0]).version == 6:
                family = socket.AF_INET6
        except ValueError:
            raise ValueError("interface must be an IP address, not %r" % interface)
    return ReusePortEndpoint(reactor, port, interface, backlog, family)


def server_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """The server endpoint ``description`` names: :func:`serverFromString`,
    with ``reuseport=yes`` accepted on ``tcp:`` and ``tcp6:``."""
    endpoint = _reuseport(description, reactor)
    if endpoint is not None:
        return endpoint
    if re.search(r"(?i)(^|(?<!\\):)reuseport=", description):
        # reuseport=no: Twisted's own parser does not know the option.
        description = ":".join(
            f for f in re.split(r"(?<!\\):", description)
            if not f.lower().startswith("reuseport="))
    found: IStreamServerEndpoint = serverFromString(reactor, description)
    return found


__all__ = ["ReusePortEndpoint", "server_endpoint"]
