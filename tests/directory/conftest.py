"""The ``store`` fixture: every store test runs on memory, SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from mailhub.directory.memory import MemoryStore
from mailhub.directory.sql import SQLStore, dialect_for
from tests.support.deferreds import result
from tests.support.postgres import throwaway_database


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: Any, tmp_path: Path) -> Iterator[SQLStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "sqlite":
        made = SQLStore(dialect_for("sqlite:///%s/db.sqlite" % tmp_path))
        result(made.migrate())
        yield made
        made.close_all()
        return
    with throwaway_database() as dsn:
        made = SQLStore(dialect_for(dsn))
        result(made.migrate())
        yield made
        made.close_all()
