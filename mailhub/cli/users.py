"""``mailhub user add|list|passwd|remove|set``: the site's users (profiles), and
each user's collector settings (``set``: opt-out, block list, forgotten addresses)."""

from __future__ import annotations

import argparse

from mailhub.cli.common import (
    IO, OK, BAD, Exit, email_address, read_password, result_of, stored, table,
)
from mailhub.config import Config
from mailhub.directory.model import Email, Profile, new_profile_id
from mailhub.directory.sql import SQLStore
from mailhub.collector.state import REASON_CLI, block_entry, login_key
from mailhub.directory.users import hash_password
from mailhub.errors import NotFound


def user_add(config: Config, args: argparse.Namespace, io: IO) -> int:
    """Create a profile whose preferred, verified address is EMAIL; print its id."""
    address = email_address(args.email)
    name = args.name.strip()
    if not name:
        raise Exit(BAD, "the name must not be empty")
    password_hash = None
    if args.password_stdin:
        password_hash = hash_password(read_password(io.stdin, io.stderr))
    nickname = (getattr(args, "nickname", "") or "").strip() or None
    profile = Profile(id=new_profile_id(), name=name, nickname=nickname,
                      emails=(Email(address, verified=True, preferred=True),))
    with stored(config) as store:
        if result_of(store.find_profile(address)) is not None:
            raise Exit(BAD, "the address %s belongs to another profile" % address)
        result_of(store.create_profile(profile))
        if password_hash is not None:
            result_of(store.set_password_hash(profile.id, password_hash))
    io.stdout.write(profile.id + "\n")
    return OK


def _find_user(store: SQLStore, id_or_email: str) -> Profile:
    wanted = id_or_email.strip()
    if "@" in wanted:
        found = result_of(store.find_profile(wanted))
    else:
        found = result_of(store.get_profile(wanted))
    if found is None:
        raise NotFound("no user %s" % wanted)
    return found


def user_list(config: Config, args: argparse.Namespace, io: IO) -> int:
    """Print every profile: id, name, addresses (preferred first), groups, password set."""
    with stored(config, create=False, note=io.stderr) as store:
        profiles = result_of(store.load_profiles())
    rows = [["ID", "NAME", "EMAIL", "GROUPS", "PASSWORD"]]
    # By name (then id): the same order on every run and every database.
    for p in sorted(profiles, key=lambda p: (p.name.casefold(), p.id)):
        addresses = sorted(p.emails, key=lambda e: (not e.preferred, not e.verified))
        shown = ",".join(e.address + ("" if e.verified else " (unverified)") for e in addresses)
        rows.append([p.id, p.name, shown, ",".join(sorted(p.groups)) or "-",
                     "yes" if p.has_password else "no"])
    table(rows, io.stdout)
    return OK


def user_passwd(config: Config, args: argparse.Namespace, io: IO) -> int:
    """Set a user's password from stdin (argon2id hash)."""
    with stored(config) as store:
        profile = _find_user(store, args.user)
        password_hash = hash_password(read_password(io.stdin, io.stderr))
        result_of(store.set_password_hash(profile.id, password_hash))
    io.stdout.write("password changed for %s\n" % profile.id)
    return OK


def user_remove(config: Config, args: argparse.Namespace, io: IO) -> int:
    """Delete a profile, with its addresses, memberships and password."""
    with stored(config) as store:
        profile = _find_user(store, args.user)
        result_of(store.remove_profile(profile.id))
    io.stdout.write("removed user %s (%s)\n" % (profile.id, profile.login))
    return OK


#: The settings ``mailhub user set`` takes, as NAME=VALUE (doc/cli.rst).
SETTINGS = ("collect", "block", "unblock", "unforget")


def _settings(pairs: list[str]) -> list[tuple[str, str]]:
    """NAME=VALUE pairs, checked; Exit(1) saying what is wrong."""
    out = []
    for pair in pairs:
        name, eq, value = pair.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not eq or name not in SETTINGS:
            raise Exit(BAD, "%r: expected NAME=VALUE with NAME one of %s"
                       % (pair, ", ".join(SETTINGS)))
        if name == "collect" and value not in ("on", "off"):
            raise Exit(BAD, "%r: collect is on or off" % pair)
        if name in ("block", "unblock") and block_entry(value) is None:
            raise Exit(BAD, "%r: expected an address (bob@example.org) or a domain "
                       "(@example.org)" % pair)
        if name == "unforget" and value != "all" and block_entry(value) is None:
            raise Exit(BAD, "%r: expected an address, or all" % pair)
        out.append((name, value))
    return out


def user_set(config: Config, args: argparse.Namespace, io: IO) -> int:
    """Change a user's collector settings, then print them.

    LOGIN is a site user's address or id, or any other login (an LDAP
    user's): the collector names users by login.
    """
    settings = _settings(args.settings)
    with stored(config) as store:
        login = args.user.strip()
        if not login:
            raise Exit(BAD, "the login must not be empty")
        try:
            login = _find_user(store, login).login
        except NotFound:
            pass  # not a site profile: an LDAP login, taken as given
        key = login_key(login)
        for name, value in settings:
            if name == "collect" and value == "off":
                result_of(store.set_collector_user(key, collect=False, reason=REASON_CLI))
            elif name == "collect":
                # On again; the book, if deleted, may be made again.
                result_of(store.set_collector_user(key, collect=True, book_seen=False,
                                                   reason=""))
            elif name == "block":
                result_of(store.change_blocks(key, add=[block_entry(value) or value]))
            elif name == "unblock":
                result_of(store.change_blocks(key, remove=[block_entry(value) or value]))
            else:
                keys = [] if value == "all" else [block_entry(value) or value]
                result_of(store.remove_tombstones(key, keys))
        row = result_of(store.collector_state(key))
    forgotten = sorted(k for k, (_, by) in row.tombstones.items() if by == "user")
    io.stdout.write("%s: collect=%s%s\n" % (login, "on" if row.collect else "off",
                                            " (%s)" % row.reason if row.reason else ""))
    io.stdout.write("blocked: %s\n" % (", ".join(row.blocks) or "-"))
    io.stdout.write("forgotten: %s\n" % (", ".join(forgotten) or "-"))
    return OK
