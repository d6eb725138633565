"""The INI file, turned into frozen values, with every key checked.

Every key has a default, so an empty file (or none) gives the embedded set-up.
An unknown section or key, or a value that cannot be used, raises
:class:`~mailhub.errors.ConfigError` naming the file, the section and the key,
so start-up stops with one clear line.

Secret values (passwords) may be written as ``env:NAME`` to read an
environment variable or ``file:/path`` to read the first line of a file, so
they need not sit in the INI file itself.
"""

from __future__ import annotations

import configparser
import os
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import attrs

from mailhub.errors import ConfigError
from mailhub.logs import redact_url

DEFAULT_SPEC = "/usr/share/amqp/specs/0-9-1/amqp0-9-1.stripped.xml"


@attrs.frozen
class MailhubSection:
    listen: str = "tcp:8080:interface=127.0.0.1"
    data: str = "./mailhub-data"
    site_id: str = "main"
    site_name: str = "mailhub"
    site_url: str = "http://localhost:8080"
    max_body: int = 1024 * 1024
    threads: int = 4
    # Connection bounds (see doc/configuration.rst): open connections at
    # most; how many of those serve only /healthz; seconds to send headers.
    max_connections: int = 800
    health_reserve: int = 16
    header_timeout: float = 15.0


@attrs.frozen
class DatabaseSection:
    dsn: str = ""  # empty: sqlite:///DATA/mailhub.sqlite
    poll_interval: float = 0.25


@attrs.frozen
class AMQPSection:
    url: str = ""
    spec: str = DEFAULT_SPEC
    heartbeat: int = 30
    outbox: int = 10000
    prefetch: int = 16


@attrs.frozen
class CardDAVSection:
    url: str = "embedded"
    username: str = ""
    password: str = attrs.field(default="", repr=False)
    addressbook: str = ""  # empty: {url}/{user}/collected/
    timeout: float = 30.0
    concurrency: int = 8


@attrs.frozen
class LDAPSection:
    """``[ldap]``: the one description of the LDAP source (the client reads it as it is)."""

    url: str = ""
    bind_dn: str = ""
    bind_password: str = attrs.field(default="", repr=False)
    base_dn: str = ""
    user_filter: str = "(&(objectClass=inetOrgPerson)(|(uid={login})(mail={login})))"
    list_filter: str = "(objectClass=inetOrgPerson)"
    login_attribute: str = "uid"
    name_attribute: str = "cn"
    mail_attribute: str = "mail"
    dn_attribute: str = ""  # empty: the entry's own DN
    start_tls: bool = False
    ca_file: str = ""
    timeout: float = 5.0
    page_size: int = 500
    pool_size: int = 4

    @property
    def urls(self) -> tuple[str, ...]:
        """The servers of ``url``, in failover order."""
        return tuple(self.url.split())

    @property
    def mail_attributes(self) -> tuple[str, ...]:
        """The attributes of ``mail_attribute`` (spaces or commas between them)."""
        return tuple(self.mail_attribute.replace(",", " ").split())

    @property
    def attributes(self) -> list[str]:
        """The attributes every search asks for, each once (compared without case)."""
        wanted = [self.login_attribute, self.name_attribute, *self.mail_attributes]
        if self.dn_attribute:
            wanted.append(self.dn_attribute)
        seen: dict[str, str] = {}
        for name in wanted:
            seen.setdefault(name.casefold(), name)
        return list(seen.values())


@attrs.frozen
class MailStoreSection:
    path: str = "/mailstore"
    username: str = ""
    password: str = attrs.field(default="", repr=False)
    # cmd=list lists the users who can log in (can_login) or every user (all).
    list: str = "can_login"


@attrs.frozen
class PushSection:
    username: str = ""
    password: str = attrs.field(default="", repr=False)
    queue: int = 1000
    max_body: int = 64 * 1024
    sse_buffer: int = 1000
    keepalive: float = 15.0
    # With no username and password set, push requests are refused (401)
    # unless this is yes: then they are accepted from loopback peers only.
    allow_loopback: bool = False


@attrs.frozen
class CollectorSection:
    enabled: bool = True
    sent_folders: tuple[str, ...] = ("Sent",)
    skip_site_users: bool = True
    queue: str = "collector:email"
    dead_letter: str = "collector:email:dead"
    retry_initial: float = 1.0
    retry_max: float = 300.0
    cache_ttl: float = 600.0  # seconds a known-address answer is trusted
    cache_size: int = 100000  # known addresses remembered (all users)
    mirror_size: int = 50000  # cards of users' books copied locally (all users)
    max_addresses: int = 1000  # addresses collected from one message at most


@attrs.frozen
class Config:
    """Everything mailhub reads from its INI file."""

    path: str | None = None
    mailhub: MailhubSection = MailhubSection()
    database: DatabaseSection = DatabaseSection()
    amqp: AMQPSection = AMQPSection()
    carddav: CardDAVSection = CardDAVSection()
    ldap: LDAPSection = LDAPSection()
    mailstore: MailStoreSection = MailStoreSection()
    push: PushSection = PushSection()
    collector: CollectorSection = CollectorSection()

    @property
    def data_dir(self) -> Path:
        return Path(self.mailhub.data)

    @property
    def dsn(self) -> str:
        """The database DSN, defaulting to SQLite in the data folder."""
        if self.database.dsn:
            return self.database.dsn
        return "sqlite:///" + str((self.data_dir / "mailhub.sqlite").absolute())

    @property
    def embedded_carddav(self) -> bool:
        return self.carddav.url == "embedded"


SECTIONS: dict[str, type] = {
    "mailhub": MailhubSection,
    "database": DatabaseSection,
    "amqp": AMQPSection,
    "carddav": CardDAVSection,
    "ldap": LDAPSection,
    "mailstore": MailStoreSection,
    "push": PushSection,
    "collector": CollectorSection,
}

#: Keys that are set together or not at all.
PAIRS = {"mailstore": [("username", "password")], "push": [("username", "password")]}

SECRETS = {("carddav", "password"), ("ldap", "bind_password"),
           ("mailstore", "password"), ("push", "password")}


def _secret(raw: str, environ: dict[str, str]) -> str:
    if raw.startswith("env:"):
        name = raw[4:]
        if name not in environ:
            raise ValueError("environment variable %s is not set" % name)
        return environ[name]
    if raw.startswith("file:"):
        try:
            with open(raw[5:], encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as e:
            raise ValueError("cannot read %s: %s" % (raw[5:], e.strerror))
    return raw


def _boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError("expected yes or no, not %r" % raw)


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def _whole_number(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be 0 or a positive whole number")
    return value


#: Whole-number keys for which 0 means "none" (every other one must be positive).
_ZERO_ALLOWED = frozenset([("collector", "mirror_size"), ("mailhub", "health_reserve")])


def _positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError("must be a positive number")
    return value


def _words(raw: str) -> tuple[str, ...]:
    """A comma-separated list (folder names may hold spaces: "Sent Items")."""
    return tuple(w.strip() for w in raw.split(",") if w.strip())


def _converter(section: str, key: str, field: attrs.Attribute) -> Callable[[str], Any]:
    kind = field.type
    if kind in (bool, "bool"):
        return _boolean
    if kind in (int, "int"):
        return _whole_number if (section, key) in _ZERO_ALLOWED else _positive_int
    if kind in (float, "float"):
        return _positive_float
    if kind in ("tuple[str, ...]",):
        return _words
    return str


def _check(section: str, key: str, value: Any) -> None:
    """Checks that need more than a type: URLs and paths."""
    if section == "database" and key == "dsn" and value:
        scheme = urlsplit(value).scheme
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError("expected sqlite:///PATH or postgresql://..., not %r" % redact(value))
    if section == "amqp" and key == "url" and value:
        if urlsplit(value).scheme not in ("amqp", "amqps"):
            raise ValueError("expected amqp://user:password@host:port/vhost")
    if section == "carddav" and key == "url" and value != "embedded":
        if urlsplit(value).scheme not in ("http", "https"):
            raise ValueError('expected "embedded" or an http(s) URL')
    if section == "ldap" and key == "url" and value:
        for url in value.split():
            if urlsplit(url).scheme not in ("ldap", "ldaps"):
                raise ValueError("expected ldap:// or ldaps:// URLs, not %r" % url)
    if section == "ldap" and key == "ca_file" and value and not os.path.isfile(value):
        raise ValueError("no such file: %s" % value)
    if section == "mailstore" and key == "path" and not value.startswith("/"):
        raise ValueError("must start with /")
    if section == "mailstore" and key == "list" and value not in ("can_login", "all"):
        raise ValueError("expected can_login or all")
    if section == "mailhub" and key == "site_url":
        if urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("expected an http(s) URL")


def redact(dsn_or_url: str) -> str:
    """A DSN or URL with its password replaced by ``***``, fit to print.

    One implementation for the CLI, the checks and the log: see
    :func:`mailhub.logs.redact_url` (which also hides password query parameters).
    """
    return redact_url(dsn_or_url)


def parse(text: str, path: str = "<string>",
          environ: dict[str, str] | None = None) -> Config:
    """Read INI text into a Config, or raise ConfigError naming what is wrong."""
    env = dict(os.environ if environ is None else environ)
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    try:
        parser.read_string(text, source=path)
    except configparser.Error as e:
        raise ConfigError("%s: cannot parse: %s" % (path, str(e).splitlines()[0]))
    sections: dict[str, Any] = {}
    for section in parser.sections():
        if section not in SECTIONS:
            raise ConfigError("%s: [%s]: unknown section (known: %s)"
                              % (path, section, ", ".join(SECTIONS)))
        cls = SECTIONS[section]
        fields = {f.name: f for f in attrs.fields(cls)}
        values = {}
        for key, raw in parser.items(section):
            if key not in fields:
                raise ConfigError("%s: [%s] %s: unknown key (known: %s)"
                                  % (path, section, key, ", ".join(fields)))
            try:
                if (section, key) in SECRETS:
                    raw = _secret(raw, env)
                value = _converter(section, key, fields[key])(raw.strip())
                _check(section, key, value)
            except ValueError as e:
                raise ConfigError("%s: [%s] %s: bad value: %s" % (path, section, key, e))
            values[key] = value
        for first, second in PAIRS.get(section, ()):
            if bool(values.get(first)) != bool(values.get(second)):
                missing_key = second if values.get(first) else first
                raise ConfigError("%s: [%s] %s: must be set too (%s and %s go together; "
                                  "an empty password would be accepted by nobody)"
                                  % (path, section, missing_key, first, second))
        sections[section] = cls(**values)
    mailhub = sections.get("mailhub", MailhubSection())
    if mailhub.health_reserve >= mailhub.max_connections:
        raise ConfigError("%s: [mailhub] health_reserve: bad value: must be smaller than "
                          "max_connections (%d)" % (path, mailhub.max_connections))
    return Config(path=path, **sections)


def load(path: str | None, environ: dict[str, str] | None = None) -> Config:
    """Read the INI file at ``path`` (None: every default)."""
    if path is None:
        return Config()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("%s: cannot read: %s" % (path, e.strerror))
    except UnicodeDecodeError:
        raise ConfigError("%s: not UTF-8 text" % (path,))
    return parse(text, path, environ)
