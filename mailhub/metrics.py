"""Prometheus metrics, one registry per running mailhub (not the global one).

Each part asks for its instruments by name; asking twice gives the same one,
so parts need not agree on who creates what. Tests build their own Metrics
and read values back with :meth:`Metrics.value`.

``/metrics`` serves :meth:`Metrics.exposition` from the reactor thread (see
web/ops.py). prometheus_client's own ``prometheus_client.twisted.MetricsResource``
does not fit: it is a WSGI resource run in the global reactor's thread pool,
so the callback gauges (which read reactor-thread state) would be read from a
worker thread, and it answers in another content type (version 1.0.0).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics import MetricWrapperBase

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

#: The content type of :meth:`Metrics.exposition` (Prometheus text format 0.0.4).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

_Instrument = TypeVar("_Instrument", bound=MetricWrapperBase)


class Metrics:
    """The instruments of one mailhub process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._made: dict[str, MetricWrapperBase] = {}

    def _get(self, kind: type[_Instrument], name: str, doc: str, labels: Sequence[str],
             **kw: Any) -> _Instrument:
        made = self._made.get(name)
        if made is None:
            made = kind(name, doc, list(labels), registry=self.registry, **kw)
            self._made[name] = made
        if not isinstance(made, kind):
            raise TypeError("metric %s is a %s, not a %s" % (
                name, type(made).__name__, kind.__name__))
        return made

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        """The counter called ``name`` (made on first use)."""
        return self._get(Counter, name, doc, labels)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        """The gauge called ``name`` (made on first use)."""
        return self._get(Gauge, name, doc, labels)

    def histogram(self, name: str, doc: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        """The histogram called ``name`` (made on first use)."""
        return self._get(Histogram, name, doc, labels, buckets=buckets)

    def gauge_callback(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read from ``read()`` at every scrape.

        Asking again for the same name replaces the callable (a service
        built anew in tests reads its own state).
        """
        self.gauge(name, doc).set_function(read)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The current value of a sample (0 when never set): for tests and checks."""
        found = self.registry.get_sample_value(name, labels or {})
        return 0.0 if found is None else found

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)
