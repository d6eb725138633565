"""The seams of the directory that have more than one implementation.

``IDirectoryStore`` is the database (SQLite, PostgreSQL, and the in-memory
fake the tests use); ``IUserSource`` is "who is this user and is this their
password" (the site's users, LDAP, and both chained).

Every method returns a Deferred (or is ``async``): stores and sources do their
blocking work in a thread pool they own, never on the reactor thread.

The methods are annotated (without ``self``, as zope declares them) so that
mypy with the ``mypy_zope`` plugin checks every ``@implementer`` against them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, AsyncIterator

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from mailhub.directory.model import Email, Group, Profile, User
    from mailhub.directory.table import ProfileTable
    from mailhub.directory.tokens import TokenRecord


class IDirectoryStore(Interface):
    """Durable profiles, groups, memberships, the token, audit and passwords.

    Every write also appends a row to the change log (``changes_since``), in
    the same transaction, so that every instance's cache can follow it.
    """

    def get_token() -> "Deferred[str | None]":
        """Deferred firing with the site token, or None when none was made."""

    def set_token(token: str | None,
                  previous_until: float | None = None) -> "Deferred[None]":
        """Replace the site token; the one replaced stays valid until
        ``previous_until`` (seconds since the epoch; None: not at all)."""

    def load_tokens() -> "Deferred[list[TokenRecord]]":
        """The site token and every named token: a list of
        :class:`~mailhub.directory.tokens.TokenRecord`, the site's first."""

    def set_named_token(name: str, token: str, scopes: frozenset[str] | None = None,
                        previous_until: float | None = None) -> "Deferred[bool]":
        """Create or rotate a named token limited to ``scopes`` (a rotation
        keeps its scopes when None); True if new."""

    def revoke_token(name: str) -> "Deferred[bool]":
        """Delete a named token; True if it existed."""

    def audit(event: str, client: str, detail: str = "") -> "Deferred[None]":
        """Append to the audit log: what happened, from which client address.

        ``detail`` never holds a secret.
        """

    def audit_log(limit: int = 100) -> "Deferred[list[dict[str, str]]]":
        """The newest ``limit`` audit rows, newest first: dicts with
        ``at`` (ISO 8601 UTC), ``event``, ``client``, ``detail``."""

    def load_profiles() -> "Deferred[list[Profile]]":
        """Every profile, with addresses and groups: a list of Profile."""

    def load_table() -> "Deferred[ProfileTable]":
        """Every profile, in the compact
        :class:`~mailhub.directory.table.ProfileTable` the in-memory directory
        holds, built where the store's blocking work runs."""

    def member_ids(after: str, limit: int) -> "Deferred[list[str]]":
        """The ids of up to ``limit`` profiles in a group, after ``after``
        in byte order (the in-memory directory's): a page of the ``users``
        list, read from the database while the directory loads."""

    def members(after: str, limit: int) -> "Deferred[list[Profile]]":
        """The profiles of :meth:`member_ids`, with addresses and groups."""

    def mark(seq: int) -> "Deferred[tuple[str, str | None, int]]":
        """Which database this is (no password), when change ``seq`` was
        logged (None: no such change), and how many profiles there are: what
        tells a saved table (:mod:`mailhub.directory.snapshot`) it is of
        this database and of its present state."""

    def get_profile(profile_id: str) -> "Deferred[Profile | None]":
        """Profile by id, or None."""

    def find_profile(address: str) -> "Deferred[Profile | None]":
        """Profile owning the address (exact, case-insensitive), or None."""

    def create_profile(profile: Profile) -> "Deferred[Profile]":
        """Store a new Profile (its id, name, nickname and emails).

        Fails with ValidationError when an address belongs to another profile.
        """

    def update_profile(profile_id: str, name: str, nickname: str | None) -> "Deferred[None]":
        """Change name and nickname of a profile."""

    def set_email(profile_id: str, email: Email) -> "Deferred[None]":
        """Add an Email to a profile, or replace that address's state."""

    def remove_profile(profile_id: str) -> "Deferred[bool]":
        """Delete a profile with its addresses, memberships and password."""

    def set_password_hash(profile_id: str, password_hash: str | None) -> "Deferred[None]":
        """Store (or, with None, clear) a profile's password hash."""

    def get_password_hash(profile_id: str) -> "Deferred[str | None]":
        """The profile's password hash, or None."""

    def load_groups() -> "Deferred[list[Group]]":
        """Every Group."""

    def create_group(group: Group) -> "Deferred[Group]":
        """Store a new Group; ValidationError if the id is taken."""

    def remove_group(group_id: str) -> "Deferred[bool]":
        """Delete a group and its memberships; True if it existed."""

    def add_member(group_id: str, profile_id: str) -> "Deferred[bool]":
        """Add a membership; True if new, False if it was there already."""

    def remove_member(group_id: str, profile_id: str) -> "Deferred[bool]":
        """Remove a membership; True if it existed."""

    def changes_since(seq: int) -> "Deferred[list[tuple[int, str, str]]]":
        """Change-log rows after ``seq``: a list of (seq, kind, key).

        ``kind`` is ``profile``, ``group`` or ``token``; ``key`` the id (for
        a token the site id, or ``SITE/NAME`` for a named token).
        """

    def last_change() -> "Deferred[int]":
        """The newest change-log sequence number (0 when empty)."""

    def ping() -> "Deferred[bool]":
        """Deferred that fires when the database answers a trivial query."""


class IUserSource(Interface):
    """Who a user is, whether a password is theirs, and every user there is."""

    name: str = Attribute("Short name of the source: 'site', 'ldap', 'chain'.")

    def find(login: str) -> "Deferred[User | None]":
        """Deferred firing with the User whose login or address this is, or None.

        Fails with :class:`mailhub.errors.Unavailable` when the source cannot
        be asked now.
        """

    def authenticate(login: str, password: str) -> "Deferred[User | None]":
        """Deferred firing with the User if the password is theirs, else None.

        An empty password is always None. Fails with Unavailable when the
        source cannot be asked: never a success then.
        """

    def pages(page_size: int) -> AsyncIterator[list[User]]:
        """An async iterator of lists of User, every user once, in pages.

        Memory stays bounded by the page size, whatever the number of users.
        """

    def catch_up():  # type: ignore[no-untyped-def]
        """Deferred firing once the source has seen the changes made elsewhere.

        A source that answers from memory (the site's users, following the
        database every poll interval) reads the latest changes now; one that
        asks its server each time (LDAP) fires at once. For callers that
        must not call a user unknown when they may just be new (the collector).
        """
