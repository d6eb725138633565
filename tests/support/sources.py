"""What every IUserSource answers, checked the same way for each implementation.

``verifyObject`` sees that the methods exist; :func:`check_user_source` also
checks what they return (a Deferred firing with a :class:`User` or None, pages
as lists of User), so the site's users and LDAP cannot drift apart again.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from mailhub.directory.interfaces import IUserSource
from mailhub.directory.model import User


def _is_user(value: Any) -> bool:
    return (isinstance(value, User) and isinstance(value.login, str)
            and isinstance(value.name, str) and isinstance(value.emails, tuple)
            and all(isinstance(e, str) for e in value.emails)
            and (value.dn is None or isinstance(value.dn, str)))


async def check_user_source(source: Any, login: str, password: str) -> None:
    """Assert that ``source`` answers as IUserSource promises, for a user who
    logs in as ``login`` with ``password`` (and no user called ``nobody-x``)."""
    assert verifyObject(IUserSource, source)
    assert isinstance(source.name, str) and source.name
    calls = {
        "find": source.find(login),
        "find unknown": source.find("nobody-x"),
        "authenticate": source.authenticate(login, password),
        "authenticate wrong": source.authenticate(login, password + "-wrong"),
        "authenticate empty": source.authenticate(login, ""),
    }
    for what, call in calls.items():
        assert isinstance(call, Deferred), (what, call)
    answers = {what: await call for what, call in calls.items()}
    assert _is_user(answers["find"]), answers["find"]
    assert answers["find unknown"] is None
    assert _is_user(answers["authenticate"]), answers["authenticate"]
    assert answers["authenticate"].login == answers["find"].login
    assert answers["authenticate wrong"] is None
    assert answers["authenticate empty"] is None
    pages = source.pages(2)
    assert hasattr(pages, "__aiter__"), pages
    seen = 0
    async for page in pages:
        assert isinstance(page, list) and page, page
        assert len(page) <= 2 and all(_is_user(u) for u in page), page
        seen += len(page)
        if seen >= 4:
            break
    await pages.aclose()
    assert seen > 0
