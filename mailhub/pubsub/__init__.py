"""ESN-compatible pubsub: ``hub.local`` in process, ``hub.global_`` across nodes.

Both have ESN's API: ``topic(name)`` gives a topic with ``subscribe(cb)``,
``unsubscribe(cb)``, ``publish(data)`` and ``forward(other, data)``.
``publish`` returns a Deferred that fires when the publication is done (for the
global pubsub: confirmed by the broker).
"""

from __future__ import annotations

import attrs

from mailhub.pubsub.local import LocalPubSub


@attrs.define
class Hub:
    """The two pubsubs every part of mailhub publishes on.

    Without a broker, ``global_`` is the same object as ``local``, so global
    topics behave as local ones.
    """

    local: LocalPubSub = attrs.Factory(LocalPubSub)
    global_: object = None

    def __attrs_post_init__(self) -> None:
        if self.global_ is None:
            self.global_ = self.local
