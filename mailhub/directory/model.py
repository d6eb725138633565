"""Plain values of the site directory, with no I/O.

Identifiers follow GroupServer: profile ids are 22 base62 characters, the site
token is a random integer below ``62**32`` written in base 62.
"""

from __future__ import annotations

import enum
import re
import secrets
from typing import Iterable

import attrs

BASE62 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
PRIVACY = ("public", "site", "private", "secret")
#: The group types mailhub stores, and the title GroupServer shows (and its
#: ``/gs-group-groups.json`` hook answers) for each: the names of the four
#: ``gs.group.type.*`` packages' types.
GROUP_TYPES = {
    "discussion": "Discussion group",
    "announcement": "Announcement group",
    "support": "Support group",
    "closed": "Closed group",
}
GROUP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def base62(number: int) -> str:
    """Write a non-negative integer in base 62 (alphabet 0-9a-zA-Z)."""
    if number < 0:
        raise ValueError("negative number")
    digits = []
    while True:
        number, rest = divmod(number, 62)
        digits.append(BASE62[rest])
        if not number:
            return "".join(reversed(digits))


def new_profile_id() -> str:
    """A fresh 22-character base62 profile id, as GroupServer makes them."""
    return "".join(secrets.choice(BASE62) for _ in range(22))


def new_token() -> str:
    """A fresh site token: 32 base62 characters from a CSPRNG.

    GroupServer draws an integer below 62**32 and writes it in base 62, which
    gives about 32 characters; mailhub pads to exactly 32 so that the length
    is a promise.
    """
    return base62(secrets.randbelow(62**32)).rjust(32, "0")


def normalise_email(address: str) -> str:
    """The form addresses are compared in: trimmed and case-folded."""
    return address.strip().casefold()


class Added(enum.Enum):
    """What adding someone to a group did (the web hooks map it to GroupServer's numbers)."""

    #: No profile owned the address: one was made, then added.
    NEW_PROFILE = "new-profile"
    #: An existing profile joined the group.
    EXISTING_PROFILE = "existing-profile"
    #: The profile was a member already: nothing changed.
    ALREADY_MEMBER = "already-member"


class Left(enum.Enum):
    """What taking someone out of a group did."""

    LEFT = "left"
    NO_SUCH_GROUP = "no-such-group"
    NO_SUCH_USER = "no-such-user"
    NOT_A_MEMBER = "not-a-member"


@attrs.frozen
class Email:
    """One address of a profile."""

    address: str
    verified: bool = True
    preferred: bool = False


@attrs.frozen
class Profile:
    """A person on the site, as GroupServer's profile data describes them."""

    id: str
    name: str
    nickname: str | None = None
    emails: tuple[Email, ...] = ()
    groups: tuple[str, ...] = ()
    has_password: bool = False

    @property
    def preferred(self) -> list[str]:
        return [e.address for e in self.emails if e.preferred and e.verified]

    @property
    def unverified(self) -> list[str]:
        return [e.address for e in self.emails if not e.verified]

    @property
    def login(self) -> str:
        """The name a site user logs in with: the preferred address, else any."""
        preferred = self.preferred
        if preferred:
            return preferred[0]
        return self.emails[0].address if self.emails else self.id

    def has_address(self, address: str) -> bool:
        wanted = normalise_email(address)
        return any(normalise_email(e.address) == wanted for e in self.emails)

    def url(self, site_url: str) -> str:
        return "%s/p/%s" % (site_url.rstrip("/"), self.nickname or self.id)

    def data(self, site_url: str) -> dict[str, object]:
        """GroupServer's profile data: id, name, url, groups and email."""
        every = [e.address for e in self.emails]
        preferred = self.preferred
        unverified = self.unverified
        other = [a for a in every if a not in preferred and a not in unverified]
        return {
            "id": self.id,
            "name": self.name,
            "url": self.url(site_url),
            "groups": sorted(self.groups),
            "email": {
                "all": every,
                "preferred": preferred,
                "other": other,
                "unverified": unverified,
            },
        }


def group_type_title(group_type: str) -> str:
    """GroupServer's title of a stored group type: ``"discussion"`` is ``"Discussion group"``.

    A value mailhub does not know (a title imported as it was, or a site's
    own type) is answered as stored.
    """
    return GROUP_TYPES.get(group_type, group_type)


@attrs.frozen
class Group:
    """A group of the site: id, name, list address, type and privacy.

    ``type`` is stored as mailhub's short name (a key of :data:`GROUP_TYPES`).
    """

    id: str
    name: str
    email: str = ""
    type: str = "discussion"
    privacy: str = "public"

    def data(self, site_url: str) -> dict[str, object]:
        """GroupServer's group data, its ``type`` the type's title."""
        return {
            "id": self.id,
            "name": self.name,
            "url": "%s/groups/%s" % (site_url.rstrip("/"), self.id),
            "email": self.email,
            "type": group_type_title(self.type),
            "privacy": self.privacy,
        }


@attrs.frozen
class User:
    """Someone a user source knows: what MailStore, SSE and CardDAV need.

    ``login`` is the name they authenticate with; ``emails`` every address
    they own; ``dn`` the LDAP distinguished name where there is one;
    ``source`` names the source that answered (``site`` or ``ldap``).
    """

    login: str
    name: str = ""
    emails: tuple[str, ...] = ()
    dn: str | None = None
    source: str = "site"
    id: str | None = None
    #: Whether they can authenticate at all: a site profile without a
    #: password cannot (LDAP users are checked by LDAP itself). Not part of
    #: equality: it says how the user was listed, not who they are.
    can_login: bool = attrs.field(default=True, eq=False)

    def owns(self, address: str) -> bool:
        wanted = normalise_email(address)
        return normalise_email(self.login) == wanted or any(
            normalise_email(e) == wanted for e in self.emails
        )

    def mailstore(self) -> dict[str, object]:
        """The entry of MailStore's ``cmd=list`` answer for this user."""
        entry: dict[str, object] = {"userName": self.login}
        if self.dn:
            entry["distinguishedName"] = self.dn
        if self.name:
            entry["fullName"] = self.name
        entry["emailAddresses"] = list(self.emails)
        return entry


def user_of(profile: Profile) -> User:
    """The site user a profile is."""
    return User(
        login=profile.login,
        name=profile.name,
        emails=tuple(e.address for e in profile.emails),
        source="site",
        id=profile.id,
        can_login=profile.has_password,
    )


def unique(items: Iterable[str]) -> list[str]:
    """Items in their first order, each once (compared case-insensitively)."""
    seen: set[str] = set()
    out = []
    for item in items:
        key = item.casefold()
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out
