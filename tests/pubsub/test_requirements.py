"""A pubsub test whose AMQP spec file is missing skips (and so fails in CI)."""

from __future__ import annotations

import pytest

from tests.pubsub.fakes import require_spec


def test_missing_spec_skips_saying_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under CI=true the root conftest's hook turns this skip into a failure
    # (tests/test_ci.py proves the hook, for every way of skipping).
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="amqp-specs"):
        require_spec("/nonexistent/amqp0-9-1.stripped.xml")
