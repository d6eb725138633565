"""In-memory stand-ins for the push surfaces' dependencies."""

from __future__ import annotations

from typing import Any, AsyncIterator

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mailhub.directory.interfaces import IUserSource
from mailhub.directory.model import User


@implementer(IUserSource)
class FakeUserSource:
    """Users and their passwords in a dict: the IUserSource the tests use."""

    name = "fake"

    def __init__(self, users: dict[str, tuple[User, str]] | None = None) -> None:
        self.users: dict[str, tuple[User, str]] = dict(users or {})
        self.asked: list[str] = []

    def add(self, user: User, password: str) -> None:
        self.users[user.login] = (user, password)

    def _lookup(self, login: str) -> tuple[User, str] | None:
        for user, password in self.users.values():
            if user.owns(login):
                return user, password
        return None

    def find(self, login: str) -> Deferred[User | None]:
        found = self._lookup(login)
        return succeed(found[0] if found else None)

    def catch_up(self) -> Deferred[None]:
        return succeed(None)

    def authenticate(self, login: str, password: str) -> Deferred[User | None]:
        self.asked.append(login)
        found = self._lookup(login)
        if found is None or not password or found[1] != password:
            return succeed(None)
        return succeed(found[0])

    async def _pages(self, page_size: int) -> AsyncIterator[list[User]]:
        users = [u for u, _ in self.users.values()]
        for start in range(0, len(users), page_size):
            yield users[start:start + page_size]

    def pages(self, page_size: int) -> Any:
        return self._pages(page_size)
