"""Prometheus metrics, one registry per running mailhub (not the global one).

Each part asks for its instruments by name; asking twice gives the same one,
so parts need not agree on who creates what. Tests build their own Metrics
and read values back with :meth:`Metrics.value`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _CallbackGauges:
    """A collector that reads gauges from callables at scrape time."""

    def __init__(self) -> None:
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def collect(self) -> Any:
        for name, (doc, read) in sorted(self.gauges.items()):
            yield GaugeMetricFamily(name, doc, value=float(read()))


class Metrics:
    """The instruments of one mailhub process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._made: dict[str, Any] = {}
        self._callbacks = _CallbackGauges()
        self.registry.register(self._callbacks)  # type: ignore[arg-type]

    def _get(self, kind: type, name: str, doc: str, labels: Sequence[str], **kw: Any) -> Any:
        made = self._made.get(name)
        if made is None:
            made = kind(name, doc, list(labels), registry=self.registry, **kw)
            self._made[name] = made
        return made

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return self._get(Counter, name, doc, labels)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return self._get(Gauge, name, doc, labels)

    def histogram(self, name: str, doc: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        return self._get(Histogram, name, doc, labels, buckets=buckets)

    def gauge_callback(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read from ``read()`` at every scrape."""
        self._callbacks.gauges[name] = (doc, read)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The current value of a sample (0 when never set): for tests and checks."""
        found = self.registry.get_sample_value(name, labels or {})
        return 0.0 if found is None else found

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
