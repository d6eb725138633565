"""The INI file, turned into frozen values, with every key checked.

Every key has a default, so an empty file (or none) gives the embedded set-up.
An unknown section or key, or a value that cannot be used, raises
:class:`~mailhub.errors.ConfigError` naming the file, the section and the key,
so start-up stops with one clear line.

Secret values (passwords, and the database DSN, which may hold one) may be
written as ``env:NAME`` to read an environment variable or ``file:/path`` to
read the first line of a file, so they need not sit in the INI file itself.

SQLite DSNs follow SQLAlchemy's convention: ``sqlite:///mailhub.sqlite`` (three
slashes) is relative to the working folder, ``sqlite:////var/lib/x.sqlite``
(four) is absolute. mailhub never creates the folder a DSN names: a typo there
stops start-up instead of writing a database nobody will find.
"""

from __future__ import annotations

import configparser
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import unquote, urlsplit

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
    # Operations endpoints (doc/operations.rst): a listen address of their
    # own for /metrics and /openapi.json (empty: the main one), and Basic
    # credentials they require (both empty: none).
    ops_listen: str = ""
    ops_user: str = ""
    ops_password: str = attrs.field(default="", repr=False)


@attrs.frozen
class DatabaseSection:
    dsn: str = attrs.field(default="", repr=False)  # empty: sqlite:////DATA/mailhub.sqlite
    poll_interval: float = 0.25
    # Seconds between two exchanges of the failure throttle's records with
    # the other instances (mailhub.shared_throttle).
    throttle_sync: float = 1.0


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
    routing_key: str = ""  # used when the queue's exchange exists as a direct one
    queue_type: str = "classic"  # quorum: replicated on a RabbitMQ cluster's nodes
    retry_initial: float = 1.0
    retry_max: float = 300.0
    cache_ttl: float = 600.0  # seconds a known-address answer is trusted
    cache_size: int = 100000  # known addresses remembered (all users)
    mirror_size: int = 50000  # cards of users' books copied locally (all users)
    max_addresses: int = 1000  # addresses collected from one message at most
    calendar: str = "organizer"  # organizer: only events the user organises; all
    esn_id_profile: str = ""  # nickname: a site profile's nickname is its ESN id
    esn_id_attribute: str = ""  # the LDAP attribute holding a user's ESN id
    exclude_defaults: bool = True  # never collect robots, bounces, VERP (doc/collector.rst)
    exclude_addresses: tuple[str, ...] = ()  # more addresses never collected (globs)
    exclude_domains: tuple[str, ...] = ()  # domains (and subdomains) never collected
    exclude_lists: bool = True  # never collect the site's groups' addresses
    note: str = "Collected automatically from {source} on {date}."  # NOTE of cards; empty: none
    dead_letter_days: int = 30  # spool dead letters older than this are deleted; 0: kept
    rank: bool = True  # X-MAILHUB-COUNT and -LAST-USED in cards, written at most daily
    max_contacts: int = 0  # collected contacts kept per user at most (0: no cap)
    expire_days: int = 0  # collected contacts unused this many days are removed (0: never)
    retention_interval: float = 86400.0  # seconds between two retention passes
    forget: bool = True  # a contact the user deletes is not collected again (doc/collector.rst)
    forget_days: int = 0  # days a contact the user deleted stays uncollected; 0: for ever
    book_opt_out: bool = True  # deleting the collected book turns collection off for the user


#: The values of ``[hooks] status_codes``.
STATUS_CODES = ("http", "groupserver")


@attrs.frozen
class HooksSection:
    # http: refusals answer 400/403; groupserver: 200, as GroupServer does.
    status_codes: str = "http"


@attrs.frozen
class Config:
    """Everything mailhub reads from its INI file.

    ``path`` is the file read (None: the built-in defaults); ``origin`` says
    how it was chosen (:func:`locate`), so the CLI and the start-up log can
    tell an administrator which configuration, and so which database, they got.
    """

    path: str | None = None
    origin: str = ""
    mailhub: MailhubSection = MailhubSection()
    database: DatabaseSection = DatabaseSection()
    amqp: AMQPSection = AMQPSection()
    carddav: CardDAVSection = CardDAVSection()
    ldap: LDAPSection = LDAPSection()
    mailstore: MailStoreSection = MailStoreSection()
    push: PushSection = PushSection()
    collector: CollectorSection = CollectorSection()
    hooks: HooksSection = HooksSection()

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

    @property
    def source(self) -> str:
        """Which configuration this is, fit to print: the file (absolute) or the
        built-in defaults, with how it was chosen."""
        what = os.path.abspath(self.path) if self.path else "built-in defaults"
        if not self.origin or self.origin == "--config":  # named by the administrator
            return what
        return "%s (%s)" % (what, self.origin)


SECTIONS: dict[str, type] = {
    "mailhub": MailhubSection,
    "database": DatabaseSection,
    "amqp": AMQPSection,
    "carddav": CardDAVSection,
    "ldap": LDAPSection,
    "mailstore": MailStoreSection,
    "push": PushSection,
    "collector": CollectorSection,
    "hooks": HooksSection,
}

#: Keys that are set together or not at all.
PAIRS = {"mailstore": [("username", "password")], "push": [("username", "password")],
         "mailhub": [("ops_user", "ops_password")]}

SECRETS = {("database", "dsn"), ("carddav", "password"), ("ldap", "bind_password"),
           ("mailstore", "password"), ("push", "password"), ("mailhub", "ops_password"),
           # The broker's URL holds its password, as a DSN does.
           ("amqp", "url")}


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


def sqlite_path(dsn: str) -> str:
    """The file a ``sqlite:`` DSN names, read as SQLAlchemy reads it.

    ``sqlite:///NAME`` is relative to the working folder, ``sqlite:////PATH``
    absolute, ``sqlite:///:memory:`` an in-memory database. ValueError when the
    DSN names a host or no file.
    """
    parts = urlsplit(dsn)
    if parts.scheme != "sqlite":
        raise ValueError("not a sqlite DSN")
    if parts.netloc:
        raise ValueError("sqlite DSNs are sqlite:///NAME (relative) or "
                         "sqlite:////PATH (absolute), with no host")
    path = unquote(parts.path)[1:]  # the third slash only separates
    if path in ("", "/"):
        raise ValueError("the sqlite DSN names no file")
    return path


def _sqlite_folder_exists(dsn: str) -> None:
    """ValueError when the folder of a sqlite DSN's file does not exist."""
    path = sqlite_path(dsn)
    if path == ":memory:":
        return
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        where = "" if os.path.isabs(path) else " (relative to %s)" % os.getcwd()
        raise ValueError("the folder %s%s does not exist; mailhub does not create it. "
                         "sqlite:///NAME is relative to the working folder, "
                         "sqlite:////PATH absolute" % (folder, where))


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
_ZERO_ALLOWED = frozenset([("collector", "mirror_size"), ("mailhub", "health_reserve"),
                           ("collector", "dead_letter_days"), ("collector", "max_contacts"),
                           ("collector", "expire_days"), ("collector", "forget_days")])


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
        if scheme == "sqlite":
            _sqlite_folder_exists(value)
    if section == "amqp" and key == "url" and value:
        # Several nodes of one cluster: separated by commas and/or spaces.
        for url in re.split(r"[,\s]+", value.strip()):
            if url and urlsplit(url).scheme not in ("amqp", "amqps"):
                raise ValueError("expected amqp://user:password@host:port/vhost URLs "
                                 "(several separated by commas), not %r" % redact(url))
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
    if section == "hooks" and key == "status_codes" and value not in STATUS_CODES:
        raise ValueError("expected %s, not %r" % (" or ".join(STATUS_CODES), value))
    if section == "collector" and key == "queue_type" and value not in ("classic", "quorum"):
        raise ValueError("expected classic or quorum")
    if section == "collector" and key == "calendar" and value not in ("organizer", "all"):
        raise ValueError("expected organizer or all")
    if section == "collector" and key == "esn_id_profile" and value not in ("", "nickname"):
        raise ValueError("expected nickname or nothing")
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
    ldap = sections.get("ldap")
    if ldap is not None and ldap.url and not ldap.base_dn:
        # An empty base searches from the root DSE: most servers find nobody
        # there, so every login would fail while `mailhub check` bound fine.
        raise ConfigError("%s: [ldap] base_dn: must be set when url is set "
                          "(the subtree where users are searched)" % path)
    return Config(path=path, **sections)


#: The environment variable naming the INI file when no ``--config`` is given
#: (set but empty: the built-in defaults, whatever :data:`SYSTEM_CONFIG` holds).
CONFIG_VARIABLE = "MAILHUB_CONFIG"

#: The INI file read when neither ``--config`` nor :data:`CONFIG_VARIABLE`
#: names one, if it exists (the path doc/operations.rst installs it at).
SYSTEM_CONFIG = "/etc/mailhub/mailhub.ini"


def locate(option: str | None, environ: Mapping[str, str] | None = None,
           system: str | None = None) -> tuple[str | None, str]:
    """The INI file to read (None: the built-in defaults), and how it was chosen.

    The same order for ``twistd mailhub`` and every verb of the ``mailhub``
    command, so that both find the same database: ``--config FILE``; else
    ``$MAILHUB_CONFIG`` (empty: the defaults); else ``/etc/mailhub/mailhub.ini``
    when it exists; else the built-in defaults.
    """
    if option is not None:
        return option, "--config"
    env = os.environ if environ is None else environ
    if CONFIG_VARIABLE in env:
        named = env[CONFIG_VARIABLE]
        if named:
            return named, "from %s" % CONFIG_VARIABLE
        return None, "%s is set and empty" % CONFIG_VARIABLE
    system = SYSTEM_CONFIG if system is None else system
    if os.path.exists(system):
        return system, "no --config or %s; found at %s" % (CONFIG_VARIABLE, system)
    return None, "no --config, no %s, no %s" % (CONFIG_VARIABLE, system)


def discover(option: str | None, environ: Mapping[str, str] | None = None,
             system: str | None = None) -> Config:
    """The Config :func:`locate` chooses, read with :func:`load`, its origin recorded."""
    path, origin = locate(option, environ, system)
    config = load(path, None if environ is None else dict(environ))
    return attrs.evolve(config, origin=origin)


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
