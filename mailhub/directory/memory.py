"""An in-memory directory store for unit tests and throwaway runs.

It is the real :class:`~mailhub.directory.sql.SQLStore` on an in-memory
SQLite database, run inline on the calling thread, so its Deferreds fire at
once and ``SynchronousTestCase.successResultOf`` can read them: the tests
exercise the same SQL that production runs.
"""

from __future__ import annotations

from mailhub.directory.sql import SQLiteDialect, SQLStore, run_inline


class MemoryStore(SQLStore):
    """A migrated, empty, synchronous store that lives as long as the object."""

    def __init__(self, site_id: str = "main") -> None:
        super().__init__(SQLiteDialect(":memory:"), site_id, runner=run_inline)
        self.migrate().addErrback(lambda f: f.raiseException())
