"""``mailhub token create``: a new site token, printed as GroupServer prints it."""

from __future__ import annotations

import argparse

from mailhub.cli.common import IO, OK, UNREACHABLE, Exit, open_store, result_of
from mailhub.config import Config
from mailhub.directory.model import new_token
from mailhub.errors import Unavailable

#: GroupServer's words around the new token (REFERENCE.md section 2).
TOKEN_CHANGED = "The authentication token has been changed to the following:"
TOKEN_UPDATE = "Please update the relevant configuration files."


def token_create(config: Config, args: argparse.Namespace, io: IO) -> int:
    """Replace the site token and print it as GroupServer does."""
    store = open_store(args.dsn or config.dsn, config.mailhub.site_id)
    try:
        token = new_token()
        result_of(store.set_token(token))
        # The audit log says that it changed, never what to.
        result_of(store.audit("token:rotated", "cli", "mailhub token create"))
    except Unavailable as e:
        raise Exit(UNREACHABLE, "cannot change the token: %s" % e)
    finally:
        store.close_all()
    io.stdout.write("%s\n%s\n%s\n" % (TOKEN_CHANGED, token, TOKEN_UPDATE))
    return OK
