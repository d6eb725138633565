"""``mailhub group add|list|remove``: the site's groups."""

from __future__ import annotations

import argparse

from mailhub.cli.common import IO, OK, BAD, Exit, email_address, result_of, stored, table
from mailhub.config import Config
from mailhub.directory.model import GROUP_ID, GROUP_TYPES, PRIVACY, Group


def group_add(config: Config, args: argparse.Namespace, io: IO) -> int:
    """Create a group after checking its id, name, address, privacy and type."""
    problems = []
    if not GROUP_ID.match(args.group_id):
        problems.append("the group id %r must be 1 to 64 letters, digits, '_', '.' or '-', "
                        "starting with a letter or digit" % args.group_id)
    name = args.name.strip()
    if not name:
        problems.append("the group name must not be empty")
    if args.privacy not in PRIVACY:
        problems.append("the privacy must be one of %s" % ", ".join(PRIVACY))
    if args.type not in GROUP_TYPES:
        problems.append("the type must be one of %s" % ", ".join(GROUP_TYPES))
    address = ""
    if args.email:
        try:
            address = email_address(args.email)
        except Exit as e:
            problems.append(e.message)
    if problems:
        raise Exit(BAD, "; ".join(problems))
    group = Group(id=args.group_id, name=name, email=address, type=args.type,
                  privacy=args.privacy)
    with stored(config) as store:
        result_of(store.create_group(group))
    io.stdout.write("added group %s\n" % group.id)
    return OK


def group_list(config: Config, args: argparse.Namespace, io: IO) -> int:
    """Print every group with its name, list address, privacy and member count."""
    with stored(config, create=False, note=io.stderr) as store:
        groups = result_of(store.load_groups())
        profiles = result_of(store.load_profiles())
    members: dict[str, int] = {}
    for profile in profiles:
        for group_id in profile.groups:
            members[group_id] = members.get(group_id, 0) + 1
    rows = [["ID", "NAME", "EMAIL", "PRIVACY", "MEMBERS"]]
    rows += [[g.id, g.name, g.email, g.privacy, str(members.get(g.id, 0))] for g in groups]
    table(rows, io.stdout)
    return OK


def group_remove(config: Config, args: argparse.Namespace, io: IO) -> int:
    """Delete a group and its memberships (the members' profiles stay)."""
    with stored(config) as store:
        if not result_of(store.remove_group(args.group_id)):
            raise Exit(BAD, "no group %s" % args.group_id)
    io.stdout.write("removed group %s\n" % args.group_id)
    return OK
