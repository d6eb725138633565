"""The Dovecot configuration that sends push notifications to this mailhub.

``mailhub dovecot-config`` prints it: for the Lua script mailhub ships (every
event, in every folder) or Dovecot's built-in OX driver (deliveries into
INBOX), in Dovecot 2.3's syntax (``plugin { }`` settings) or 2.4's (named
filters, ``lua_settings``), with the path where the script is installed, the
URL where mailhub answers (from ``[mailhub] listen``, else ``site_url``) and
the ``[push]`` user. The password is a placeholder unless the admin asks
for it (``--with-password``): a command's output ends up in terminals,
tickets and shell histories, and the admin may want to put the secret in
place some other way.

Everything here is plain functions of a :class:`~mailhub.config.Config`; the
command only parses its options and prints.
"""

from __future__ import annotations

import argparse
import importlib.resources
import re
from pathlib import Path
from typing import Protocol, TextIO
from urllib.parse import urlsplit

from mailhub.config import Config
from mailhub.errors import ConfigError

DRIVERS = ("lua", "ox")
VERSIONS = ("2.3", "2.4")
LUA_PATH = "/push/v1/notify"
OX_PATH = "/preliminary/http-notify/v1/notify"
PLACEHOLDER = "CHANGE-ME"
METADATA_KEY = "/private/vendor/vendor.dovecot/http-notify"

#: What Dovecot sends as it is inside a URL's userinfo: it does not
#: percent-decode, so nothing may need encoding.
_URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+\Z")
#: A setting value Dovecot reads as written; anything else is quoted.
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9._~:/@+=,-]+\Z")


def data_path(name: str) -> Path:
    """Where the installed package keeps one of its Dovecot files."""
    path = Path(str(importlib.resources.files("mailhub") / "data" / "dovecot" / name))
    if not path.is_file():
        raise ConfigError("%s is not installed as a file (%s): reinstall mailhub "
                          "from a wheel or a source tree" % (name, path))
    return path


def lua_script_path() -> Path:
    """The installed ``mailhub-push.lua``, the file Dovecot's Lua driver loads."""
    return data_path("mailhub-push.lua")


def _listen_parts(listen: str) -> list[str]:
    """A Twisted endpoint description split on its unescaped colons."""
    parts, current, chars = [], "", iter(listen)
    for char in chars:
        if char == "\\":
            current += next(chars, "")
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def listen_url(listen: str) -> str | None:
    """``http(s)://HOST:PORT`` where a ``[mailhub] listen`` endpoint answers, or
    None when it is no TCP port Dovecot could reach (unix socket, systemd...).

    An endpoint on every address is reached through loopback: Dovecot usually
    runs on the same machine.
    """
    kind, *rest = _listen_parts(listen.strip())
    if kind.isdigit():  # the old "8080" form means tcp:8080
        kind, rest = "tcp", [kind] + rest
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    positional = [p for p in rest if "=" not in p]
    named = dict(p.split("=", 1) for p in rest if "=" in p)
    port = named.get("port") or (positional[0] if positional else "")
    if not port.isdigit():
        return None
    host = named.get("interface", "")
    if host in ("", "0.0.0.0"):
        host = "::1" if kind == "tcp6" else "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = "[%s]" % host
    return "%s://%s:%s" % ("https" if kind == "ssl" else "http", host, port)


def receiver_base(config: Config, url: str | None = None) -> tuple[str, str]:
    """mailhub's base URL as Dovecot reaches it, and where it came from."""
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("--url: expected http(s)://HOST[:PORT], not %r" % url)
        if parts.username is not None:
            raise ConfigError("--url: give it without credentials; they come from [push]")
        return url.rstrip("/"), "--url"
    listen = config.mailhub.listen
    direct = listen_url(listen)
    if direct is not None:
        return direct, "[mailhub] listen = %s" % listen
    return (config.mailhub.site_url.rstrip("/"),
            "[mailhub] site_url (listen = %s is no TCP port)" % listen)


def value(text: str) -> str:
    """A setting value as Dovecot's config reads it back: ``%`` doubled (Dovecot
    expands %variables in these settings), quoted unless it is plain."""
    text = text.replace("%", "%%")
    if _PLAIN_VALUE.match(text):
        return text
    return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')


def _credentials(config: Config, with_password: bool) -> tuple[str, str] | None:
    """The [push] user and the password to print, None when none are needed."""
    push = config.push
    if not push.username:
        if push.allow_loopback:
            return None
        raise ConfigError(
            "[push] username and password are not set, so mailhub refuses every push "
            "request (401): set them in %s first (or allow_loopback = yes for a Dovecot "
            "on this machine)" % (config.path or "the config file"))
    return push.username, push.password if with_password else PLACEHOLDER


def _password_note(config: Config, with_password: bool) -> list[str]:
    if with_password or not config.push.username:
        return []
    return ["# %s: put the [push] password of %s here (mailhub dovecot-config "
            "--with-password prints it)." % (PLACEHOLDER, config.path or "mailhub's config")]


def render(config: Config, driver: str = "lua", version: str = "2.3",
           script: Path | None = None, url: str | None = None,
           with_password: bool = False) -> str:
    """The Dovecot configuration, as text to drop into ``/etc/dovecot/conf.d/``."""
    if driver not in DRIVERS:
        raise ConfigError("--driver: expected one of %s, not %r" % (", ".join(DRIVERS), driver))
    if version not in VERSIONS:
        raise ConfigError("--dovecot: expected one of %s, not %r"
                          % (", ".join(VERSIONS), version))
    if script is not None and not script.is_absolute():
        raise ConfigError("--lua-file: Dovecot needs an absolute path, not %s" % script)
    base, source = receiver_base(config, url)
    credentials = _credentials(config, with_password)
    head = ["# mailhub push notifications: Dovecot %s, %s driver."
            % (version, "OX" if driver == "ox" else "Lua"),
            "# Made by: mailhub dovecot-config --driver %s --dovecot %s" % (driver, version),
            "# Receiver: %s (from %s)." % (base, source)]
    if driver == "lua":
        return "\n".join(head + _lua(version, base, credentials, script or lua_script_path(),
                                     _password_note(config, with_password))) + "\n"
    return "\n".join(head + _ox(version, base, credentials,
                                _password_note(config, with_password))) + "\n"


def _lua(version: str, base: str, credentials: tuple[str, str] | None, script: Path,
         note: list[str]) -> list[str]:
    settings = [("mailhub_push_url", base + LUA_PATH)]
    if credentials is not None:
        settings += [("mailhub_push_username", credentials[0]),
                     ("mailhub_push_password", credentials[1])]
    lines = ["# Every event (deliveries, IMAP APPEND such as saving to Sent, flags,",
             "# expunges, mailbox changes) in every folder: one POST per transaction.",
             "# Dovecot's mail processes must be able to read the script."] + note
    if version == "2.3":
        if re.search(r"\s", str(script)):
            # 2.3 splits push_notification_driver's options on spaces
            raise ConfigError("Dovecot 2.3 cannot load a script whose path holds a space "
                              "(%s): copy it elsewhere and give --lua-file" % script)
        return lines + [
            "mail_plugins = $mail_plugins notify push_notification mail_lua "
            "push_notification_lua",
            "",
            "plugin {",
            "  push_notification_driver = %s" % value("lua:file=%s" % script),
        ] + ["  %s = %s" % (key, value(text)) for key, text in settings] + [
            "  #mailhub_push_timeout_msecs = 2000",
            "}",
        ]
    return lines + [
        "mail_plugins {",
        "  notify = yes",
        "  push_notification = yes",
        "  mail_lua = yes",
        "  push_notification_lua = yes",
        "}",
        "",
        "push_notification lua {",
        "  lua_file = %s" % value(str(script)),
        "  lua_settings {",
    ] + ["    %s = %s" % (key, value(text)) for key, text in settings] + [
        "    #mailhub_push_timeout_msecs = 2000",
        "  }",
        "}",
    ]


def _ox(version: str, base: str, credentials: tuple[str, str] | None,
        note: list[str]) -> list[str]:
    if credentials is not None:
        for what, text in zip(("username", "password"), credentials):
            if not _URL_SAFE.match(text):
                raise ConfigError(
                    "the [push] %s holds characters that Dovecot's OX driver cannot send "
                    "(it does not percent-decode a URL's credentials; letters, digits and "
                    "- . _ ~ only): choose another, or use --driver lua" % what)
        scheme, _, rest = base.partition("://")
        base = "%s://%s:%s@%s" % (scheme, credentials[0], credentials[1], rest)
    lines = ["# Deliveries (LDA/LMTP) into INBOX only: one PUT per message.",
             "# It sends nothing for a user until they have this server METADATA",
             "# (-s \"\": the server's, not a mailbox's; Dovecot keeps it with INBOX),",
             "# which needs the mail attribute dictionary below (if none is set yet):",
             "#   doveadm mailbox metadata set -u USER -s \"\" %s user=USER" % METADATA_KEY]
    lines += note
    if version == "2.3":
        return lines + [
            "#mail_attribute_dict = file:%h/dovecot-attributes",
            "protocol lmtp {",
            "  mail_plugins = $mail_plugins notify push_notification",
            "}",
            "protocol lda {",
            "  mail_plugins = $mail_plugins notify push_notification",
            "}",
            "",
            "plugin {",
            "  push_notification_driver = %s" % value("ox:url=" + base + OX_PATH),
            "}",
        ]
    plugins = ["  mail_plugins {", "    notify = yes", "    push_notification = yes", "  }"]
    return lines + [
        "#mail_attribute {",
        "#  dict file {",
        "#    path = %{home}/dovecot-attributes",
        "#  }",
        "#}",
        "protocol lmtp {", *plugins, "}",
        "protocol lda {", *plugins, "}",
        "",
        "push_notification ox {",
        "  push_notification_ox_url = %s" % value(base + OX_PATH),
        "}",
    ]


# -- the command --------------------------------------------------------------------


class Streams(Protocol):
    """The command's output streams (mailhub.cli's IO)."""

    @property
    def stdout(self) -> TextIO: ...


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mailhub dovecot-config``."""
    parser.add_argument("--driver", choices=DRIVERS, default="lua",
                        help="lua: mailhub's script, every event (default); "
                             "ox: Dovecot's built-in driver, deliveries into INBOX only")
    parser.add_argument("--dovecot", choices=VERSIONS, default="2.3", dest="dovecot_version",
                        help="the Dovecot version's syntax (default: 2.3)")
    parser.add_argument("--url", metavar="BASE", default=None,
                        help="mailhub's base URL as Dovecot reaches it (default: from "
                             "[mailhub] listen, else site_url)")
    parser.add_argument("--lua-file", metavar="PATH", type=Path, default=None,
                        help="where Dovecot finds mailhub-push.lua (default: where mailhub "
                             "installed it)")
    parser.add_argument("--with-password", action="store_true",
                        help="print the configured [push] password instead of a placeholder")


def command(config: Config, args: argparse.Namespace, io: Streams) -> int:
    """Print the configuration; errors are ConfigError (exit 1)."""
    io.stdout.write(render(config, args.driver, args.dovecot_version, script=args.lua_file,
                           url=args.url, with_password=args.with_password))
    return 0
