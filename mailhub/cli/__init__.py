"""The ``mailhub`` command: the tokens, groups, users, and a health check.

Every verb reads the same INI file as ``twistd -n mailhub``, found the same
way (:func:`mailhub.config.locate`: ``--config FILE`` before or after the verb,
else ``$MAILHUB_CONFIG``, else ``/etc/mailhub/mailhub.ini`` if it exists, else
the embedded defaults, SQLite under ``./mailhub-data``) and works on the same
database, so what it changes the
running server sees without a restart: the server follows the database's
change log (as each change commits on PostgreSQL, every poll interval on
SQLite), and reads the tokens from the database when a caller's token does
not match one it holds.

One module per verb: :mod:`~mailhub.cli.token`, :mod:`~mailhub.cli.groups`,
:mod:`~mailhub.cli.users`, :mod:`~mailhub.cli.dead` and :mod:`~mailhub.cli.check`; this one holds the
parser and :func:`main`, the console script's entry point. The admin verbs
are synchronous: they run the directory store inline on this thread (no
reactor, no thread pool), migrating the schema first so that they work on a
fresh data folder before the server ever ran. ``check`` runs the server's
own health checks (:mod:`mailhub.checks`) on the reactor, under
``task.react``.

Exit codes: 0 success; 1 bad input, bad configuration, bad DSN or something
not found (``check``: something is not OK); 2 the database cannot be
reached.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any, Callable, NoReturn, Sequence, TextIO, cast

from mailhub import __version__
from mailhub import config as configuration
from mailhub.checks import first_line
from mailhub.cli.check import check
from mailhub.cli import dead
from mailhub.cli.common import (
    BAD, IO, OK, UNREACHABLE, Exit, database_errors, note_configuration,
)
from mailhub.cli.groups import group_add, group_list, group_remove
from mailhub.cli.token import (
    TOKEN_CHANGED, TOKEN_UPDATE, add_create_arguments, token_create, token_list, token_revoke,
)
from mailhub.cli.users import SETTINGS, user_add, user_list, user_passwd, user_remove, user_set
from mailhub.config import Config
from mailhub.directory.model import GROUP_TYPES, PRIVACY
from mailhub.push import dovecot_config
from mailhub.errors import ConfigError, NotFound, Unavailable, ValidationError

__all__ = ["main", "parser", "IO", "Exit", "OK", "BAD", "UNREACHABLE",
           "TOKEN_CHANGED", "TOKEN_UPDATE"]


#: The verbs that work on the database: without --config (or a DSN) each
#: says on stderr which configuration and database it found.
DATABASE_VERBS = frozenset(["token", "group", "user", "dead"])


# -- the parser -------------------------------------------------------------------


Command = Callable[[Config, argparse.Namespace, IO], int]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of exiting, so main() returns codes,
    and writes its help to the command's stdout."""

    def __init__(self, *args: Any, out: TextIO | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._out = out

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:
            (self._out or file or sys.stdout).write(message)

    def error(self, message: str) -> NoReturn:
        raise Exit(BAD, "%s: %s\n%s" % (self.prog, message, self.format_usage().rstrip()))

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _Done(status, message or "")


class _Done(Exception):
    """argparse finished on its own (--help): the exit status and text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parser(out: TextIO | None = None) -> argparse.ArgumentParser:
    """The ``mailhub`` argument parser: verbs, their objects and options.

    Help text goes to ``out`` (default: sys.stdout).
    """
    # Subparsers are made by argparse itself, so the stream rides on a partial.
    kind = cast("type[_Parser]", functools.partial(_Parser, out=out))
    config_option = _Parser(add_help=False)
    config_option.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS,
        help="the INI file twistd mailhub reads (default: $MAILHUB_CONFIG, else "
             "/etc/mailhub/mailhub.ini if it exists, else the built-in defaults: "
             "SQLite under ./mailhub-data)")

    top = kind(prog="mailhub", parents=[config_option],
                  description="Manage a mailhub site: token, groups, users, dead letters; "
                              "check its set-up.")
    top.add_argument("--version", action="version", version="mailhub " + __version__,
                     help="print mailhub's version and exit")
    verbs = top.add_subparsers(dest="verb", metavar="VERB", parser_class=kind)
    verbs.required = True

    def verb(name: str, text: str) -> argparse._SubParsersAction:
        sub = verbs.add_parser(name, help=text, description=text, parents=[config_option])
        actions = sub.add_subparsers(dest="action", metavar="ACTION", parser_class=kind)
        actions.required = True
        return actions

    def action(group: argparse._SubParsersAction, name: str, run: Command,
               text: str) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=text, description=text, parents=[config_option])
        sub.set_defaults(run=run)
        return sub

    token = verb("token", "the site token and the named tokens of the web hooks")
    create = action(token, "create", token_create,
                    "make a new site token (or, with --name, a named token), store it, "
                    "and print it (exit 0; 1 bad DSN or input; 2 cannot connect)")
    add_create_arguments(create)
    lister = action(token, "list", token_list,
                    "list the tokens: names, hooks, dates (never a secret)")
    lister.add_argument("dsn", metavar="DSN", nargs="?", default=None,
                        help="database to read (default: [database] dsn of the config)")
    revoke = action(token, "revoke", token_revoke, "delete a named token")
    revoke.add_argument("name", metavar="NAME")
    revoke.add_argument("dsn", metavar="DSN", nargs="?", default=None,
                        help="database to change (default: [database] dsn of the config)")

    group = verb("group", "the site's groups")
    add = action(group, "add", group_add, "create a group")
    add.add_argument("group_id", metavar="GROUP_ID")
    add.add_argument("--name", required=True, help="the group's display name")
    add.add_argument("--email", metavar="LIST_ADDRESS", default="",
                     help="the list's posting address")
    add.add_argument("--privacy", default="public", metavar="|".join(PRIVACY),
                     help="who may see the group (default: public)")
    add.add_argument("--type", default="discussion", metavar="|".join(GROUP_TYPES),
                     help="the group's type, as GroupServer's (default: discussion)")
    action(group, "list", group_list, "list the groups")
    remove = action(group, "remove", group_remove, "delete a group and its memberships")
    remove.add_argument("group_id", metavar="GROUP_ID")

    user = verb("user", "the site's users (profiles)")
    add = action(user, "add", user_add,
                 "create a user whose preferred, verified address is EMAIL; prints the new id")
    add.add_argument("email", metavar="EMAIL")
    add.add_argument("--name", required=True, help="the user's display name")
    add.add_argument("--password-stdin", action="store_true",
                     help="read a password from the first line of stdin")
    add.add_argument("--nickname", default="",
                     help="the profile's nickname (with [collector] esn_id_profile = "
                          "nickname: the user's ESN id)")
    action(user, "list", user_list, "list the users")
    passwd = action(user, "passwd", user_passwd,
                    "set a user's password, read from the first line of stdin")
    passwd.add_argument("user", metavar="EMAIL", help="an address of the user (or the id)")
    remove = action(user, "remove", user_remove, "delete a user")
    remove.add_argument("user", metavar="ID_OR_EMAIL")
    setter = action(user, "set", user_set,
                    "change a user's collector settings (collect=on|off, block=ADDRESS|@DOMAIN, "
                    "unblock=..., unforget=ADDRESS|all) and print them")
    setter.add_argument("user", metavar="LOGIN",
                        help="a site user's address or id, or an LDAP user's login")
    setter.add_argument("settings", metavar="NAME=VALUE", nargs="*",
                        help="any of %s; none: only print the settings" % ", ".join(SETTINGS))

    dead.add_arguments(verbs, config_option, kind)

    checker = verbs.add_parser("check", parents=[config_option],
                               help="reach every configured dependency and print a table",
                               description="Load the config, build the server's parts, run "
                                           "the health checks /healthz runs and print what is "
                                           "OK; exit 1 if anything is not.")
    checker.set_defaults(run=check)
    text = "print the Dovecot configuration that sends push notifications here"
    dovecot = verbs.add_parser("dovecot-config", parents=[config_option], help=text,
                               description=text[0].upper() + text[1:] + ".")
    dovecot_config.add_arguments(dovecot)
    dovecot.set_defaults(run=dovecot_config.command)
    return top


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None,
         stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run the ``mailhub`` command; returns the exit code (the console script exits with it)."""
    io = IO(stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr)
    try:
        args = parser(io.stdout).parse_args(list(sys.argv[1:] if argv is None else argv))
    except _Done as done:
        if done.message:
            io.stderr.write(done.message)
        return done.status
    except Exit as e:
        io.stderr.write(e.message + "\n")
        return e.code
    try:
        config = configuration.discover(getattr(args, "config", None))
        if args.verb in DATABASE_VERBS:
            note_configuration(config, args, io.stderr)
        return int(args.run(config, args, io))
    except Exit as e:
        io.stderr.write("mailhub: %s\n" % e.message)
        return e.code
    except ConfigError as e:
        io.stderr.write("mailhub: %s\n" % e)
        return BAD
    except (ValidationError, NotFound) as e:
        io.stderr.write("mailhub: %s\n" % e)
        return BAD
    except Unavailable as e:
        io.stderr.write("mailhub: %s\n" % e)
        return UNREACHABLE
    except database_errors() as e:
        # Reached, but unusable: not a database, no permission, a broken schema.
        io.stderr.write("mailhub: the database cannot be used: %s\n" % first_line(e))
        return UNREACHABLE

