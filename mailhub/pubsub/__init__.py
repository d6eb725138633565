"""ESN-compatible pubsub: ``hub.local`` in process, ``hub.global_`` across nodes.

Both have ESN's API: ``topic(name)`` gives a topic with ``subscribe(cb)``,
``unsubscribe(cb)``, ``publish(data)`` and ``forward(other, data)``.
``publish`` returns a Deferred that fires when the publication is done (for the
global pubsub: confirmed by the broker). The seams are the zope interfaces of
:mod:`mailhub.pubsub.interfaces`; a publication reaches the publishing
process's own subscribers at once and in order, broker or not.
"""

from __future__ import annotations

import attrs

from mailhub.pubsub.interfaces import IPubSub
from mailhub.pubsub.local import LocalPubSub


@attrs.define
class Hub:
    """The two pubsubs every part of mailhub publishes on.

    Without a broker, ``global_`` is the same object as ``local``, so global
    topics behave as local ones.
    """

    local: IPubSub = attrs.Factory(LocalPubSub)
    global_: IPubSub = attrs.Factory(lambda self: self.local, takes_self=True)
