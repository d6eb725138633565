"""``mailhub token create --name/--hook/--overlap``, ``token list``, ``token revoke``."""

from __future__ import annotations

import time

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mailhub.directory.service import Directory
from tests.support.deferreds import result
from tests.test_cli import (  # noqa: F401 (fixtures)
    assert_token_output, mailhub, postgres_site, rows, site, store_of, stored_token,
)


def grant(site: str, token: str, now: float | None = None) -> object:
    """What a freshly loaded directory (clock at ``now``) makes of ``token``."""
    store = store_of(site)
    clock = Clock()
    clock.advance(time.time() if now is None else now)
    directory = Directory(store, clock)
    try:
        result(Deferred.fromCoroutine(directory.load()))
        return result(Deferred.fromCoroutine(directory.check_token(token)))
    finally:
        store.close_all()


def test_a_named_token_is_printed_as_the_site_token_and_limited_to_its_hooks(site: str) -> None:
    main = assert_token_output(mailhub("token", "create", "--config", site))
    smtp = assert_token_output(mailhub("token", "create", "--name", "smtp2gs", "--hook",
                                       "gs-group-member-add", "--hook",
                                       "/gs-search-people.json", "--config", site))
    assert stored_token(site) == main  # the site token is untouched
    found = grant(site, smtp)
    assert found.name == "smtp2gs"  # type: ignore[attr-defined]
    assert found.scopes == {"gs-group-member-add", "gs-search-people"}  # type: ignore[attr-defined]


def test_token_list_shows_names_hooks_and_dates_never_a_secret(site: str) -> None:
    main = assert_token_output(mailhub("token", "create", "--config", site))
    smtp = assert_token_output(mailhub("token", "create", "--name", "smtp2gs", "--hook",
                                       "gs-group-member-add", "--config", site))
    ran = mailhub("token", "list", "--config", site)
    assert ran.code == 0, ran
    table = rows(ran.out)
    assert table[0] == ["NAME", "HOOKS", "CREATED", "ROTATED", "PREVIOUS VALID UNTIL"]
    assert [r[:2] for r in table[1:]] == [["site", "*"], ["smtp2gs", "gs-group-member-add"]]
    assert table[2][2] == table[2][3] and table[2][2].startswith("20")
    assert table[1][4] == table[2][4] == "-"
    assert main not in ran.out and smtp not in ran.out


def test_rotation_with_an_overlap_keeps_the_old_token_that_long(site: str) -> None:
    old = assert_token_output(mailhub("token", "create", "--config", site))
    before = time.time()
    ran = mailhub("token", "create", "--overlap", "10m", "--config", site)
    new = assert_token_output(ran)
    assert "the previous token stays valid until" in ran.err
    assert grant(site, new).name == "site"  # type: ignore[attr-defined]
    assert grant(site, old).previous  # type: ignore[attr-defined]
    assert grant(site, old, before + 601).expired  # type: ignore[attr-defined]
    listed = rows(mailhub("token", "list", "--config", site).out)
    assert listed[1][0] == "site" and listed[1][4].startswith("20")
    store = store_of(site)
    try:
        log = result(store.audit_log(10))
    finally:
        store.close_all()
    assert log[0]["event"] == "token:rotated"
    assert log[0]["detail"] == "mailhub token create --overlap 600s"
    assert old not in repr(log) and new not in repr(log)


def test_rotating_a_named_token_keeps_its_hooks_and_overlap_works(site: str) -> None:
    first = assert_token_output(mailhub("token", "create", "--name", "smtp2gs", "--hook",
                                        "gs-group-member-add", "--config", site))
    second = assert_token_output(mailhub("token", "create", "--name", "smtp2gs",
                                         "--overlap", "30s", "--config", site))
    assert grant(site, first).scopes == {"gs-group-member-add"}  # type: ignore[attr-defined]
    assert grant(site, first).previous  # type: ignore[attr-defined]
    assert grant(site, second).scopes == {"gs-group-member-add"}  # type: ignore[attr-defined]


def test_revoke_deletes_a_named_token(site: str) -> None:
    smtp = assert_token_output(mailhub("token", "create", "--name", "smtp2gs", "--hook",
                                       "gs-search-people", "--config", site))
    ran = mailhub("token", "revoke", "smtp2gs", "--config", site)
    assert (ran.code, ran.out) == (0, "revoked smtp2gs\n")
    assert grant(site, smtp) is None
    again = mailhub("token", "revoke", "smtp2gs", "--config", site)
    assert again.code == 1 and "no token named smtp2gs" in again.err
    refused = mailhub("token", "revoke", "site", "--config", site)
    assert refused.code == 1 and "cannot be revoked" in refused.err


def test_bad_names_hooks_and_durations_exit_1_and_change_nothing(site: str) -> None:
    for argv in (["--name", "smtp2gs"],  # new, without a hook
                 ["--name", "site", "--hook", "calendar"],
                 ["--name", "Bad Name", "--hook", "calendar"],
                 ["--name", "x", "--hook", "add"],
                 ["--hook", "calendar"],  # the site token has every hook
                 ["--overlap", "ten minutes"],
                 ["--overlap", "400d"]):
        ran = mailhub("token", "create", *argv, "--config", site)
        assert ran.code == 1, (argv, ran)
        assert ran.out == "" and ran.err.startswith("mailhub: "), (argv, ran)
    assert stored_token(site) is None
    assert rows(mailhub("token", "list", "--config", site).out)[1:] == []


def test_token_list_and_revoke_exit_2_when_the_database_is_unreachable() -> None:
    dsn = "postgresql://nobody@127.0.0.1:1/none"
    assert mailhub("token", "list", dsn).code == 2
    assert mailhub("token", "revoke", "x", dsn).code == 2


def test_named_tokens_on_postgresql(postgres_site: str) -> None:
    smtp = assert_token_output(mailhub("token", "create", "--name", "smtp2gs", "--hook",
                                       "calendar", "--config", postgres_site))
    assert grant(postgres_site, smtp).scopes == {"calendar"}  # type: ignore[attr-defined]
    assert mailhub("token", "revoke", "smtp2gs", "--config", postgres_site).code == 0
    assert grant(postgres_site, smtp) is None
