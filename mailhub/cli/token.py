"""``mailhub token create|list|revoke``: the site token and named tokens.

``create`` without ``--name`` replaces the site token and prints it as
GroupServer's ``gs_auth_token_create`` does; with ``--name`` it makes or
rotates a named token limited to its ``--hook`` scopes, printed the same way.
``--overlap`` keeps the replaced secret valid that long. ``list`` shows names,
scopes and dates, never a secret; ``revoke`` deletes a named token.
"""

from __future__ import annotations

import argparse
import datetime
import time
from typing import Callable

from mailhub.cli.common import BAD, IO, OK, UNREACHABLE, Exit, open_store, result_of
from mailhub.config import Config
from mailhub.directory.model import new_token
from mailhub.directory.tokens import SCOPES, SITE, check_name, parse_duration, scope_of
from mailhub.errors import Unavailable

#: GroupServer's words around the new token (REFERENCE.md section 2).
TOKEN_CHANGED = "The authentication token has been changed to the following:"
TOKEN_UPDATE = "Please update the relevant configuration files."


def add_create_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mailhub token create``."""
    parser.add_argument("dsn", metavar="DSN", nargs="?", default=None,
                        help="database to change (default: [database] dsn of the config)")
    parser.add_argument("--name", default=None,
                        help="make or rotate the named token NAME instead of the site token")
    parser.add_argument("--hook", action="append", default=[], metavar="HOOK",
                        help="a hook the named token may call (repeat for several): "
                             + ", ".join(SCOPES) + "; the hook's path works too")
    parser.add_argument("--overlap", default=None, metavar="DURATION",
                        help="keep the replaced token valid this long (30s, 10m, 1h)")


def token_create(config: Config, args: argparse.Namespace, io: IO,
                 clock: Callable[[], float] = time.time) -> int:
    """Replace the site token (or make or rotate a named one) and print it as
    GroupServer does."""
    name = getattr(args, "name", None)
    hooks = getattr(args, "hook", None) or []
    overlap_text = getattr(args, "overlap", None)
    try:
        if name is not None:
            check_name(name)
        scopes = frozenset(scope_of(h) for h in hooks) if hooks else None
        overlap = parse_duration(overlap_text) if overlap_text is not None else 0
    except ValueError as e:
        raise Exit(BAD, str(e))
    if scopes is not None and name is None:
        raise Exit(BAD, "--hook limits a named token: give --name too "
                        "(the site token is good on every hook)")
    store = open_store(args.dsn or config.dsn, config.mailhub.site_id)
    until = clock() + overlap if overlap else None
    try:
        token = new_token()
        if name is None:
            result_of(store.set_token(token, until))
        else:
            if scopes is None and not any(
                    r.name == name for r in result_of(store.load_tokens())):
                raise Exit(BAD, "no token named %s: a new one needs --hook" % name)
            result_of(store.set_named_token(name, token, scopes, until))
        # The audit log says that it changed, never what to.
        detail = "mailhub token create"
        if name is not None:
            detail += " --name %s" % name
        if scopes is not None:
            detail += "".join(" --hook %s" % s for s in sorted(scopes))
        if overlap:
            detail += " --overlap %ds" % overlap
        result_of(store.audit("token:rotated", "cli", detail))
    except Unavailable as e:
        raise Exit(UNREACHABLE, "cannot change the token: %s" % e)
    finally:
        store.close_all()
    io.stdout.write("%s\n%s\n%s\n" % (TOKEN_CHANGED, token, TOKEN_UPDATE))
    if overlap:
        io.stderr.write("mailhub: the previous token stays valid until %s\n"
                        % _when(until))
    return OK


def token_list(config: Config, args: argparse.Namespace, io: IO,
               clock: Callable[[], float] = time.time) -> int:
    """Print every token's name, scopes, dates and overlap; never a secret."""
    store = open_store(args.dsn or config.dsn, config.mailhub.site_id, create=False,
                       note=io.stderr)
    try:
        records = result_of(store.load_tokens())
    except Unavailable as e:
        raise Exit(UNREACHABLE, "cannot read the tokens: %s" % e)
    finally:
        store.close_all()
    now = clock()
    rows = [("NAME", "HOOKS", "CREATED", "ROTATED", "PREVIOUS VALID UNTIL")]
    for record in records:
        if record.name == SITE and record.secret is None:
            continue
        scopes = "*" if record.scopes is None else ",".join(sorted(record.scopes))
        until = record.previous_until
        rows.append((record.name, scopes, record.created or "-", record.rotated or "-",
                     _when(until) if until is not None and until > now else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        io.stdout.write("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() + "\n")
    return OK


def token_revoke(config: Config, args: argparse.Namespace, io: IO) -> int:
    """Delete a named token: refused from then on, its previous secret too."""
    if args.name == SITE:
        raise Exit(BAD, "the site token cannot be revoked: replace it with "
                        "mailhub token create")
    store = open_store(args.dsn or config.dsn, config.mailhub.site_id)
    try:
        gone = result_of(store.revoke_token(args.name))
        if gone:
            result_of(store.audit("token:revoked", "cli", "mailhub token revoke %s" % args.name))
    except Unavailable as e:
        raise Exit(UNREACHABLE, "cannot revoke the token: %s" % e)
    finally:
        store.close_all()
    if not gone:
        raise Exit(BAD, "no token named %s" % args.name)
    io.stdout.write("revoked %s\n" % args.name)
    return OK


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(
        timespec="seconds")
