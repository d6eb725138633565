"""The one family of errors that the domain raises and the edges translate.

Web handlers map these to an HTTP status and a JSON body in one place
(:mod:`mailhub.web.errors`); AMQP consumers map them to ack, retry or
dead-letter.
"""

from __future__ import annotations


class MailhubError(Exception):
    """Base of every error mailhub raises on purpose."""


class ValidationError(MailhubError):
    """Input that can never be accepted; ``messages`` says every reason."""

    def __init__(self, messages: list[str] | str) -> None:
        if isinstance(messages, str):
            messages = [messages]
        self.messages = list(messages)
        super().__init__("; ".join(self.messages))


class NotFound(MailhubError):
    """A named thing (user, group, profile) does not exist."""


class Unavailable(MailhubError):
    """A dependency (database, LDAP, broker, CardDAV) cannot be reached now.

    Transient: the caller may retry; a web edge answers 503.
    """


class ConfigError(MailhubError):
    """A configuration file that cannot be used: names file, section and key."""
