"""The seams of the directory that have more than one implementation.

``IDirectoryStore`` is the database (SQLite, PostgreSQL, and the in-memory
fake the tests use); ``IUserSource`` is "who is this user and is this their
password" (the site's users, LDAP, and both chained).

Every method returns a Deferred (or is ``async``): stores and sources do their
blocking work in a thread pool they own, never on the reactor thread.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IDirectoryStore(Interface):
    """Durable profiles, groups, memberships, the token, audit and passwords.

    Every write also appends a row to the change log (``changes_since``), in
    the same transaction, so that every instance's cache can follow it.
    """

    def get_token():  # type: ignore[no-untyped-def]
        """Deferred firing with the site token, or None when none was made."""

    def set_token(token, previous_until):  # type: ignore[no-untyped-def]
        """Replace the site token; the one replaced stays valid until
        ``previous_until`` (seconds since the epoch; None: not at all)."""

    def load_tokens():  # type: ignore[no-untyped-def]
        """The site token and every named token: a list of
        :class:`~mailhub.directory.tokens.TokenRecord`, the site's first."""

    def set_named_token(name, token, scopes, previous_until):  # type: ignore[no-untyped-def]
        """Create or rotate a named token limited to ``scopes``; True if new."""

    def revoke_token(name):  # type: ignore[no-untyped-def]
        """Delete a named token; True if it existed."""

    def audit(event, client, detail):  # type: ignore[no-untyped-def]
        """Append to the audit log: what happened, from which client address.

        ``detail`` never holds a secret.
        """

    def audit_log(limit):  # type: ignore[no-untyped-def]
        """The newest ``limit`` audit rows, newest first: dicts with
        ``at`` (ISO 8601 UTC), ``event``, ``client``, ``detail``."""

    def load_profiles():  # type: ignore[no-untyped-def]
        """Every profile, with addresses and groups: a list of Profile."""

    def get_profile(profile_id):  # type: ignore[no-untyped-def]
        """Profile by id, or None."""

    def find_profile(address):  # type: ignore[no-untyped-def]
        """Profile owning the address (exact, case-insensitive), or None."""

    def create_profile(profile):  # type: ignore[no-untyped-def]
        """Store a new Profile (its id, name, nickname and emails).

        Fails with ValidationError when an address belongs to another profile.
        """

    def update_profile(profile_id, name, nickname):  # type: ignore[no-untyped-def]
        """Change name and nickname of a profile."""

    def set_email(profile_id, email):  # type: ignore[no-untyped-def]
        """Add an Email to a profile, or replace that address's state."""

    def remove_profile(profile_id):  # type: ignore[no-untyped-def]
        """Delete a profile with its addresses, memberships and password."""

    def set_password_hash(profile_id, password_hash):  # type: ignore[no-untyped-def]
        """Store (or, with None, clear) a profile's password hash."""

    def get_password_hash(profile_id):  # type: ignore[no-untyped-def]
        """The profile's password hash, or None."""

    def load_groups():  # type: ignore[no-untyped-def]
        """Every Group."""

    def create_group(group):  # type: ignore[no-untyped-def]
        """Store a new Group; ValidationError if the id is taken."""

    def remove_group(group_id):  # type: ignore[no-untyped-def]
        """Delete a group and its memberships; True if it existed."""

    def add_member(group_id, profile_id):  # type: ignore[no-untyped-def]
        """Add a membership; True if new, False if it was there already."""

    def remove_member(group_id, profile_id):  # type: ignore[no-untyped-def]
        """Remove a membership; True if it existed."""

    def changes_since(seq):  # type: ignore[no-untyped-def]
        """Change-log rows after ``seq``: a list of (seq, kind, key).

        ``kind`` is ``profile``, ``group`` or ``token``; ``key`` the id.
        """

    def last_change():  # type: ignore[no-untyped-def]
        """The newest change-log sequence number (0 when empty)."""

    def ping():  # type: ignore[no-untyped-def]
        """Deferred that fires when the database answers a trivial query."""


class IUserSource(Interface):
    """Who a user is, whether a password is theirs, and every user there is."""

    name = Attribute("Short name of the source: 'site', 'ldap', 'chain'.")

    def find(login):  # type: ignore[no-untyped-def]
        """Deferred firing with the User whose login or address this is, or None.

        Fails with :class:`mailhub.errors.Unavailable` when the source cannot
        be asked now.
        """

    def authenticate(login, password):  # type: ignore[no-untyped-def]
        """Deferred firing with the User if the password is theirs, else None.

        An empty password is always None. Fails with Unavailable when the
        source cannot be asked: never a success then.
        """

    def pages(page_size):  # type: ignore[no-untyped-def]
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
