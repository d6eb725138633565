"""The cluster tests' one RabbitMQ cluster, stopped when the run ends.

Trial test cases call :func:`tests.support.rabbit_cluster.shared` in their
``setUp`` (the cluster starts on first use, once per run); this fixture only
stops it at the end of the session.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.support import rabbit_cluster


@pytest.fixture(scope="session", autouse=True)
def rabbit_cluster_stopped_at_the_end() -> Iterator[None]:
    """Stop the shared cluster (if a test started it) when the session ends."""
    yield
    rabbit_cluster.stop_shared()
