"""Reading the one authentication failure metric in tests."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.web.resource import IResource
from zope.interface import implementer

from mailhub.auth import REASONS
from mailhub.metrics import Metrics

FAILURES = "mailhub_auth_failures_total"


def auth_failures(metrics: Metrics, surface: str, reason: str | None = None) -> float:
    """``mailhub_auth_failures_total`` of one surface: one reason, or all summed."""
    reasons = REASONS if reason is None else (reason,)
    return sum(metrics.value(FAILURES, {"surface": surface, "reason": r}) for r in reasons)


@implementer(IResource)
class FromAddress:
    """Wraps a leaf resource: the ``X-Test-Client`` header becomes the peer's address.

    StubTreq's requests all come from 127.0.0.1; the throttle keys on the
    client address, so tests of several clients name theirs in a header.
    """

    isLeaf = True

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def render(self, request: Any) -> Any:
        host = request.getHeader(b"x-test-client")
        if host is not None:
            request.client = IPv4Address("TCP", host.decode("ascii"), 40000)
        return self._inner.render(request)

    def getChildWithDefault(self, name: bytes, request: Any) -> Any:
        return self

    def putChild(self, path: bytes, child: Any) -> None:
        raise NotImplementedError
