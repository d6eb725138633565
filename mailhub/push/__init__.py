"""Dovecot push notifications turned into mailhub events (plain Python, no I/O).

:func:`decode_ox` reads the body of Dovecot's OX driver, :func:`decode_lua`
the body of the Lua script mailhub ships (``contrib/dovecot/mailhub-push.lua``)
and the form bodies of other Lua scripts. Both give :class:`PushEvent` values:
a topic (``mail:new``, ``mail:append``, ``mail:flags``, ``mail:expunge``,
``mailbox:*``) and the JSON payload published on it. Anything else raises
:class:`mailhub.errors.ValidationError`, never another exception.
"""

from mailhub.push.decode import decode_lua, decode_ox, decode_words
from mailhub.push.events import TOPICS, PushEvent, topic_of

__all__ = ["PushEvent", "TOPICS", "decode_lua", "decode_ox", "decode_words", "topic_of"]
