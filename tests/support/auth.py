"""Reading the one authentication failure metric in tests."""

from __future__ import annotations

from mailhub.auth import REASONS
from mailhub.metrics import Metrics

FAILURES = "mailhub_auth_failures_total"


def auth_failures(metrics: Metrics, surface: str, reason: str | None = None) -> float:
    """``mailhub_auth_failures_total`` of one surface: one reason, or all summed."""
    reasons = REASONS if reason is None else (reason,)
    return sum(metrics.value(FAILURES, {"surface": surface, "reason": r}) for r in reasons)
