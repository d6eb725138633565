"""``mailhub user add|list|passwd|remove``: the site's users (profiles)."""

from __future__ import annotations

import argparse

from mailhub.cli.common import (
    IO, OK, BAD, Exit, email_address, read_password, result_of, stored, table,
)
from mailhub.config import Config
from mailhub.directory.model import Email, Profile, new_profile_id
from mailhub.directory.sql import SQLStore
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
