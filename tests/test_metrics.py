"""mailhub.metrics: instruments by name, callback gauges, the exposition page."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailhub.metrics import CONTENT_TYPE, Metrics
from tests.support.metrics import matching, total


class MetricsTests(SynchronousTestCase):
    def test_asking_twice_gives_the_same_instrument(self) -> None:
        metrics = Metrics()
        first = metrics.counter("mailhub_things_total", "Things", ["kind"])
        self.assertIs(metrics.counter("mailhub_things_total", "Things", ["kind"]), first)
        first.labels(kind="a").inc(2)
        self.assertEqual(metrics.value("mailhub_things_total", {"kind": "a"}), 2)
        self.assertEqual(total(metrics.exposition(), "mailhub_things_total", kind="a"), 2)

    def test_one_name_is_one_kind_of_instrument(self) -> None:
        metrics = Metrics()
        metrics.counter("mailhub_things_total", "Things")
        self.assertRaises(TypeError, metrics.gauge, "mailhub_things_total", "Things")

    def test_a_callback_gauge_is_read_at_every_scrape(self) -> None:
        metrics = Metrics()
        held = [1, 2]
        metrics.gauge_callback("mailhub_held", "Held things", lambda: len(held))
        self.assertEqual(total(metrics.exposition(), "mailhub_held"), 2)
        held.append(3)
        self.assertEqual(total(metrics.exposition(), "mailhub_held"), 3)
        self.assertEqual(metrics.value("mailhub_held"), 3)

    def test_asking_again_for_a_callback_gauge_replaces_its_callable(self) -> None:
        metrics = Metrics()
        metrics.gauge_callback("mailhub_held", "Held things", lambda: 1)
        metrics.gauge_callback("mailhub_held", "Held things", lambda: 7)
        self.assertEqual([s.value for s in matching(metrics.exposition(), "mailhub_held")], [7])

    def test_the_page_is_prometheus_text_format(self) -> None:
        self.assertEqual(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")
        metrics = Metrics()
        metrics.histogram("mailhub_seconds", "Time", ["route"]).labels(route="/x").observe(0.003)
        page = metrics.exposition()
        self.assertEqual(total(page, "mailhub_seconds_count", route="/x"), 1)
        self.assertEqual(total(page, "mailhub_seconds_bucket", route="/x", le="0.005"), 1)
        self.assertEqual(total(page, "mailhub_seconds_bucket", route="/x", le="0.0025"), 0)
