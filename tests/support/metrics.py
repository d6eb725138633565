"""Read a ``/metrics`` page the way Prometheus does, with prometheus_client's parser.

Tests ask for a sample by metric name and labels instead of matching the
exposition text with regular expressions or substrings, so a change of label
order, quoting or escaping cannot make them pass or fail by accident.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def samples(text: bytes | str) -> list[Sample]:
    """Every sample of an exposition page (a histogram's ``_bucket``... included)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return [sample for family in text_string_to_metric_families(text)
            for sample in family.samples]


def matching(text: bytes | str, name: str, **labels: str) -> list[Sample]:
    """The samples called ``name`` whose labels include ``labels``."""
    return [s for s in samples(text) if s.name == name
            and all(s.labels.get(key) == value for key, value in labels.items())]


def total(text: bytes | str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(s.value for s in matching(text, name, **labels))
