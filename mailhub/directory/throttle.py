"""Slowing down password guessing without locking real users out.

Every authentication attempt is named by the login it claims and the client
address it comes from. Failures are remembered under three keys, each with its
own exponential delay: none for the first ``free`` failures, then
``base``, doubling with each failure, capped at ``max_delay`` seconds:

``(login, client)``
    The precise key. Its delay is a *reservation*: concurrent attempts on the
    same pair are spaced out by the current delay instead of all being
    checked at once, so parallel connections do not multiply the guessing
    rate. When the next free slot lies more than ``max_delay`` ahead, the
    attempt is refused at once without checking the password (``None`` from
    :meth:`Throttle.before`). Only that pair is ever refused, so an attacker
    at one address cannot refuse the real user at another. A success
    resets the pair.
``login`` (over every client)
    Slows a distributed attack on one account. It only *delays* (never
    refuses, never reserves), and it is not applied to clients that have
    logged in as that user successfully within ``forget_after`` seconds: the
    real user's usual address keeps working at full speed during an attack
    from elsewhere; a new address waits at most ``max_delay``.
``client`` (over every login)
    Slows one address spraying many accounts. It starts only after
    ``client_free`` failures, only delays, and a success does not reset it
    (an attacker could log in as themselves to wipe it); it fades like the
    others.

Each key forgets its failures ``forget_after`` seconds after the last one.
Memory is bounded: at most ``max_keys`` entries per table, the least recently
touched dropped first. The state is per process; each mailhub instance
throttles on its own (so N instances allow at most N times the rate).

Time comes from an injected ``IReactorTime``, so tests drive it with ``Clock``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

import attrs
from twisted.internet.interfaces import IReactorTime

K = TypeVar("K", bound=Hashable)


@attrs.define
class _Record:
    failures: int = 0
    last: float = 0.0
    next_slot: float = 0.0


class _Table(Generic[K]):
    """Failure records by key, bounded in size, least recently used dropped."""

    def __init__(self, max_keys: int, forget_after: float) -> None:
        self.max_keys = max_keys
        self.forget_after = forget_after
        self._records: OrderedDict[K, _Record] = OrderedDict()

    def get(self, key: K, now: float) -> _Record | None:
        record = self._records.get(key)
        if record is None:
            return None
        if now - record.last > self.forget_after and record.next_slot <= now:
            del self._records[key]
            return None
        return record

    def touch(self, key: K, now: float) -> _Record:
        record = self.get(key, now)
        if record is None:
            record = self._records[key] = _Record(last=now)
            while len(self._records) > self.max_keys:
                self._records.popitem(last=False)
        else:
            self._records.move_to_end(key)
        return record

    def drop(self, key: K) -> None:
        self._records.pop(key, None)

    def __len__(self) -> int:
        return len(self._records)


class Throttle:
    """Delays (and, for one login at one address, refuses) repeated failures.

    Use: ``wait = throttle.before(login, client)``; if ``wait`` is None
    answer "failed" at once; otherwise wait ``wait`` seconds, check the
    password, then call ``throttle.after(login, client, succeeded)``.
    """

    def __init__(self, clock: IReactorTime, base: float = 0.25, max_delay: float = 15.0,
                 free: int = 1, login_free: int = 3, client_free: int = 10,
                 forget_after: float = 900.0, max_keys: int = 100_000) -> None:
        self.clock = clock
        self.base = base
        self.max_delay = max_delay
        self.free = free
        self.login_free = login_free
        self.client_free = client_free
        self.forget_after = forget_after
        self._pairs: _Table[tuple[str, str]] = _Table(max_keys, forget_after)
        self._logins: _Table[str] = _Table(max_keys, forget_after)
        self._clients: _Table[str] = _Table(max_keys, forget_after)
        self._trusted: _Table[tuple[str, str]] = _Table(max_keys, forget_after)

    @staticmethod
    def _login_key(login: str) -> str:
        return login.strip().casefold()[:256]

    def _delay(self, failures: int, free: int) -> float:
        """``base * 2**(failures - free - 1)`` once past ``free``, capped."""
        over = failures - free - 1
        if over < 0:
            return 0.0
        return min(self.max_delay, self.base * (2.0 ** min(over, 64)))

    def _shared_wait(self, login: str, client: str, now: float) -> float:
        """The per-login and per-client delays (which never refuse)."""
        waits = [0.0]
        if self._trusted.get((login, client), now) is None:
            record = self._logins.get(login, now)
            if record is not None:
                waits.append(self._delay(record.failures, self.login_free))
        record = self._clients.get(client, now)
        if record is not None:
            waits.append(self._delay(record.failures, self.client_free))
        return max(waits)

    def delay_of(self, login: str, client: str) -> float:
        """The delay an attempt would get now, without reserving anything."""
        now = self.clock.seconds()
        login = self._login_key(login)
        pair = self._pairs.get((login, client), now)
        pair_wait = max(pair.next_slot - now, 0.0) if pair is not None else 0.0
        return min(self.max_delay, max(pair_wait, self._shared_wait(login, client, now)))

    def before(self, login: str, client: str) -> float | None:
        """Seconds to wait before checking this attempt, or None to refuse it.

        While the pair has failures, each attempt reserves the pair's next
        slot, so concurrent attempts on one pair are spaced one delay apart.
        """
        now = self.clock.seconds()
        login = self._login_key(login)
        pair = self._pairs.get((login, client), now)
        pair_wait = 0.0
        if pair is not None and pair.failures > self.free:
            start = max(now, pair.next_slot)
            if start - now > self.max_delay:
                return None
            pair.next_slot = start + self._delay(pair.failures, self.free)
            pair_wait = start - now
        return min(self.max_delay, max(pair_wait, self._shared_wait(login, client, now)))

    def after(self, login: str, client: str, succeeded: bool) -> None:
        """Record the outcome of a checked attempt."""
        now = self.clock.seconds()
        login = self._login_key(login)
        key = (login, client)
        if succeeded:
            self._pairs.drop(key)
            self._trusted.touch(key, now).last = now
            return
        pair = self._pairs.touch(key, now)
        pair.failures += 1
        pair.last = now
        pair.next_slot = max(pair.next_slot, now + self._delay(pair.failures, self.free))
        for table, table_key in ((self._logins, login), (self._clients, client)):
            record = table.touch(table_key, now)  # type: ignore[attr-defined]
            record.failures += 1
            record.last = now

    def sizes(self) -> dict[str, int]:
        """Entries per table (for metrics and the tests of the memory bound)."""
        return {"pairs": len(self._pairs), "logins": len(self._logins),
                "clients": len(self._clients), "trusted": len(self._trusted)}
