"""Reading Deferreds that have already fired, outside trial's test cases."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


def result(d: "Deferred[Any]") -> Any:
    """The result of a Deferred that has fired, re-raising its failure."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]
