"""What the collector never collects, whose calendar an event is, and what a card says.

- :class:`Exclusions`: addresses never collected (robots and bounces, the
  site's mailing lists, configured domains and patterns), decided on the
  address's comparison key with one compiled pattern and two set lookups,
  so the engine's hot path stays cheap.
- :class:`EsnIds`: the ESN (OpenPaaS) id of a site user and back, where the
  site maps it (``[collector] esn_id_profile`` for site profiles,
  ``[collector] esn_id_attribute`` for LDAP users).
- :class:`Origin`: where a collector message came from (mail, calendar or
  queue; the Message-ID or event UID; the event's organizer), and
  :func:`note_text`, the NOTE line written into each card.
"""

from __future__ import annotations

import fnmatch
import re
from datetime import datetime
from typing import Any, Callable, Iterable

import attrs
from cachetools import LRUCache
from twisted.internet.interfaces import IReactorTime

from mailhub.collector.addresses import address_key
from mailhub.decoding import domain_forms
from mailhub.directory.model import User, user_of

#: Addresses no one writes to on purpose: robots, bounces, list machinery.
#: Matched (``re.match``: from the start) against the address's comparison key (local part
#: case-folded, domain in its ASCII form, lower-case). Documented in
#: doc/collector.rst, "Exclusions"; ``[collector] exclude_defaults = no``
#: turns them off, ``[collector] exclude_addresses`` adds to them.
DEFAULT_PATTERNS: tuple[tuple[str, str], ...] = (
    ("no-reply addresses", r"^(no-?reply|do-?not-?reply|donotreply)([+._-][^@]*)?@"),
    ("mail system addresses", r"^(mailer-daemon|postmaster|daemon)@"),
    ("bounce addresses", r"^bounces?([+._-][^@]*)?@"),
    ("mailing-list machinery", r"^(owner-[^@]+|[^@]+-(owner|request|bounces?))@"),
    ("VERP return paths (``list-bounces+alice=example.org@``)",
     r"^[^@]*[+-][^@]*=[^@=]+\.[^@=]+@"),
    ("SRS and BATV return paths", r"^(srs[01]|prvs|btv1|msprvs1)[=+]"),
)

#: Reasons counted in ``mailhub_collector_skipped_total{reason}``.
ROBOT = "robot"
MAILING_LIST = "mailing_list"
DOMAIN = "excluded_domain"


def _domain_key(domain: str) -> str | None:
    """A domain as address keys hold it (Unicode form, case-folded); a name
    that is not a domain (one label) is kept as written, lower-case."""
    domain = domain.strip().strip(".")
    if not domain:
        return None
    forms = domain_forms(domain)
    return forms[1].casefold() if forms is not None else domain.casefold()


def compile_patterns(globs: Iterable[str], defaults: bool = True) -> re.Pattern[str] | None:
    """One compiled pattern: the defaults (if ``defaults``) and the ``globs``.

    A glob (``fnmatch``: ``*``, ``?``, ``[...]``) is matched against the
    whole address, case-insensitively. None when there is nothing to match.
    """
    parts = [p for _, p in DEFAULT_PATTERNS] if defaults else []
    parts.extend(fnmatch.translate(g.strip().casefold()) for g in globs if g.strip())
    if not parts:
        return None
    return re.compile("|".join("(?:%s)" % p for p in parts))


class Exclusions:
    """Addresses never collected, and why: :meth:`reason` on an address key.

    ``lists`` gives the site's mailing-list addresses (the directory
    groups' ``email``); it is read again at most every ``lists_ttl``
    seconds, so a new group's address is excluded within that time.
    """

    def __init__(self, *, patterns: Iterable[str] = (), defaults: bool = True,
                 domains: Iterable[str] = (),
                 lists: Callable[[], Iterable[str]] | None = None,
                 clock: IReactorTime | None = None, lists_ttl: float = 30.0) -> None:
        self._pattern = compile_patterns(patterns, defaults)
        self._domains = frozenset(filter(None, (_domain_key(d) for d in domains)))
        self._lists_of = lists
        self._clock = clock
        self._lists_ttl = lists_ttl
        self._lists: frozenset[str] = frozenset()
        self._lists_at: float | None = None

    def _site_lists(self) -> frozenset[str]:
        if self._lists_of is None:
            return self._lists
        now = self._clock.seconds() if self._clock is not None else 0.0
        if self._lists_at is None or now - self._lists_at >= self._lists_ttl or now < self._lists_at:
            self._lists = frozenset(filter(None, (address_key(a) for a in self._lists_of() if a)))
            self._lists_at = now
        return self._lists

    def reason(self, key: str) -> str | None:
        """Why the address (its comparison key) is never collected, or None."""
        # Every pattern is anchored at the start: match, never search.
        if self._pattern is not None and self._pattern.match(key):
            return ROBOT
        if self._domains:
            domain = key.rpartition("@")[2]
            while domain:
                if domain in self._domains:
                    return DOMAIN
                domain = domain.partition(".")[2]
        lists = self._site_lists()
        if lists and key in lists:
            return MAILING_LIST
        return None


def group_addresses(directory: Any) -> Callable[[], list[str]]:
    """The site's mailing-list addresses, read from a Directory's groups."""
    def read() -> list[str]:
        return [g.email for g in directory.groups() if g.email]
    return read


class EsnIds:
    """The ESN (OpenPaaS) ids of the site's users, where the site maps them.

    OpenPaaS names a user by its MongoDB id (``eventPath``
    ``/calendars/<id>/...``, ``bookHome``), which mailhub does not know
    unless the site says where it is kept:

    - ``profile``: ``nickname`` (a site profile's nickname is its ESN id)
      or empty (not mapped); ``directory`` is the in-memory Directory;
    - ``ldap`` and ``attribute``: the LDAP user source (its ``find_by``
      and ``attribute_of``) and the attribute holding the ESN id
      (``[collector] esn_id_attribute``), or None and empty.

    An LDAP user's id is asked once and remembered (``cache_size`` users).
    """

    def __init__(self, directory: Any = None, profile: str = "", ldap: Any = None,
                 attribute: str = "", cache_size: int = 10_000) -> None:
        if profile not in ("", "nickname"):
            raise ValueError("esn_id_profile must be empty or nickname, not %r" % profile)
        self._directory = directory
        self._profile = profile if directory is not None else ""
        self._ldap = ldap if attribute else None
        self._attribute = attribute
        self._ids: LRUCache[str, str] = LRUCache(maxsize=max(1, cache_size))

    @property
    def mapped(self) -> bool:
        """Whether the site maps ESN ids at all."""
        return bool(self._profile or self._ldap is not None)

    async def find(self, esn_id: str) -> User | None:
        """The user whose ESN id is ``esn_id``, or None."""
        if self._profile == "nickname":
            profile = self._directory.profile_by_nickname(esn_id)
            if profile is not None:
                return user_of(profile)
        if self._ldap is not None:
            return await self._ldap.find_by(self._attribute, esn_id)  # type: ignore[no-any-return]
        return None

    async def id_of(self, user: User) -> str:
        """The id the site knows for ``user``: its ESN id where mapped, else
        its profile id (site users), else its login."""
        if self._profile == "nickname" and user.source == "site" and user.id:
            profile = self._directory.profile(user.id)
            if profile is not None and profile.nickname:
                return profile.nickname  # type: ignore[no-any-return]
        if self._ldap is not None and user.source == "ldap":
            known = self._ids.get(user.login)
            if known is None:
                known = await self._ldap.attribute_of(user.login, self._attribute) or ""
                self._ids[user.login] = known
            if known:
                return known
        return user.id or user.login


#: Where collector messages come from, as the card says it.
SOURCES = ("mail", "calendar", "queue")
#: The words ``{source}`` stands for in the NOTE line.
SOURCE_WORDS = {"mail": "sent mail", "calendar": "a calendar event",
                "queue": "the collector queue"}
DEFAULT_NOTE = "Collected automatically from {source} on {date}."


@attrs.frozen
class Origin:
    """Where a collector message came from.

    ``source``: ``mail`` (mailhub's sent-folder source), ``calendar``
    (a calendar event) or ``queue`` (any other publisher, e.g. Apache
    James or OpenPaaS); ``ref``: the Message-ID or event UID where known;
    ``organizer``: the event's organizer address (calendar only).
    """

    source: str = "queue"
    ref: str = ""
    organizer: str = ""

    @classmethod
    def of_message(cls, message: dict[str, Any]) -> "Origin":
        """The origin a (decoded) collector message states, ``queue`` when unsaid."""
        source = message.get("source")
        if source not in SOURCES:
            source = "queue"
        ref = message.get("messageId") if source != "calendar" else message.get("eventUid")
        organizer = message.get("organizer")
        return cls(source=source, ref=ref.strip() if isinstance(ref, str) else "",
                   organizer=organizer.strip() if isinstance(organizer, str) else "")


def note_text(template: str, origin: Origin, when: datetime) -> str:
    """The NOTE of a card: ``template`` with ``{source}``, ``{date}`` and
    ``{ref}`` filled in (empty template: no NOTE). Unknown placeholders are
    left as they are."""
    if not template:
        return ""
    values = {"source": SOURCE_WORDS.get(origin.source, origin.source),
              "date": when.strftime("%Y-%m-%d"), "ref": origin.ref}
    return re.sub(r"\{(source|date|ref)\}", lambda m: values[m.group(1)], template)


def exclusions_of(section: Any, directory: Any, clock: IReactorTime) -> Exclusions:
    """The :class:`Exclusions` of a ``[collector]`` section."""
    return Exclusions(patterns=section.exclude_addresses, defaults=section.exclude_defaults,
                      domains=section.exclude_domains,
                      lists=group_addresses(directory) if section.exclude_lists else None,
                      clock=clock)


def esn_ids_of(section: Any, directory: Any, ldap: Any) -> EsnIds:
    """The :class:`EsnIds` of a ``[collector]`` section (``ldap``: the LDAP
    user source, or None without LDAP)."""
    return EsnIds(directory, section.esn_id_profile, ldap, section.esn_id_attribute)
