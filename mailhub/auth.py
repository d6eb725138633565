"""Checking secrets, in one place for every surface.

Every surface that checks a secret goes through this module: the GroupServer
hooks and the calendar collector (the site token), the Dovecot push receivers
and MailStore's service account (static Basic credentials), MailStore's
``cmd=auth``, the event stream and ``/dav/`` (users' passwords). Each check
is throttled by one shared :class:`Throttle`, each failure is counted in one
metric, ``mailhub_auth_failures_total{surface, reason}`` (accepted passwords and
tokens in ``mailhub_auth_successes_total{surface}``; the service accounts'
accepted requests are counted by their surfaces), logged without the secret, and
password logins are published as ``login:success`` / ``login:failure``.

Reasons a check fails
    ``missing`` (no credentials or no token), ``empty`` (an empty password
    or token), ``wrong``, ``throttled`` (refused without being checked: the
    client is over its failure budget), ``unconfigured`` (the service
    credentials are not set), ``unavailable`` (the user source could not
    be asked: answered 503, never a success), ``scope`` (a named token used
    where it was not made for) and ``expired`` (a token's previous secret
    after its overlap ended).

The throttle's keys
    An attempt is named by a *login* and a *client* (the peer's address).
    For password logins the login is the name given; for the other secrets
    it is one fixed name per secret (``token:site``, ``service:push``,
    ``service:mailstore``), so every guess at one secret counts together.
    Every token guess counts under ``token:site`` (a guess names no token);
    a named token's success trusts the address under ``token:NAME`` only.

From delay to refusal
    Failures are remembered per (login, client), per login and per client.
    The pair and the client keys hand out *slots*: once past their free
    failures, each attempt reserves the key's next slot, one delay after the
    previous one (0.25 s doubling up to ``max_delay``, 15 s). An attempt whose
    slot lies more than ``max_delay`` ahead is refused at once, without
    asking anyone: no password hash, no LDAP bind, no token lookup. So the
    delay a client has earned becomes a *rate*: at most one checked guess
    per delay per key, however many connections it opens, and what it sends
    beyond that costs a dictionary lookup. Each slot is reserved as if its
    attempt will fail (the next attempt's delay doubles), and password checks
    still in flight count as failures for the client's budget once it has
    failed at all (and past 32 at once even before), so a burst of parallel
    connections is spaced out before its failures are known, while a
    legitimate burst of logins from one address (a NAT, MailStore) is not.
    A flood of random logins from one address therefore cannot starve the
    password-hashing pool: about ten checks go through at once, a handful
    more spaced over the next 15 s, then one per 15 s; everything else is
    refused unchecked, and other addresses are never refused for it. A (login,
    client) pair that succeeded within the last ``forget_after`` seconds is
    exempt from its client's budget (the real user behind a shared address
    keeps working); a success never resets a client's budget (an attacker
    could log in as themselves to wipe it). The per-login key only delays,
    never refuses, and spares pairs that succeeded lately, so an attack from
    elsewhere cannot lock the real user out.

Waiting
    A password is checked only when its slot comes (the surface waits on the
    clock; the reactor does not). A token or static credential is cheap to
    compare, so it is compared at once: the right one is answered at once,
    and surfaces that want it (``slow_answers``: the hooks, the calendar
    endpoint, the event stream) hold a wrong one's answer until the delay
    it earned has passed. ``/dav/`` refuses any wait longer than its
    ``max_wait`` (a waiting request holds a worker thread). The push
    receivers' hot path (:class:`StaticBasic`): the exact expected header,
    with no failure on record anywhere, is accepted after one constant-time
    comparison, with no Deferred and no table touched.

Shared by the instances
    Every instance on one database shares the failures: each failure (and a
    success that clears a pair's failures) is written to the database in a
    batch every ``[database] throttle_sync`` seconds, and every instance
    reads the others' at the same pace and counts them as its own
    (:meth:`Throttle.shared`, :mod:`mailhub.shared_throttle`). So an
    attacker has one budget whichever instance they reach, within a bound
    of staleness (two intervals, 2 s by default). Successes are not
    written (a pair's first success after failures is), so the common case
    costs no database write; the slots reserved by attempts in progress and
    the trust a success earns an address stay per process.

Memory is bounded (``max_keys`` entries per table, least recently used
dropped first).
Time comes from an injected ``IReactorTime``, so tests drive it with ``Clock``.

Klein routes require a checker with :func:`requires`, as Tahoe-LAFS's storage
server wraps its routes: the checker answers the refusal (401 or 403, after
the wait it owes), or hands the handler what it proved (the :class:`User`).
"""

from __future__ import annotations

import base64
import functools
import hmac
import ipaddress
from collections import OrderedDict
from typing import (
    Any, Awaitable, Callable, Generic, Hashable, Protocol, TypeVar,
)

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from mailhub.directory.interfaces import IUserSource
from mailhub.directory.model import User
from mailhub.directory.tokens import SITE, Grant, scope_of
from mailhub.errors import Unavailable
from mailhub.events import login_event, publish
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.web.common import (
    HTTPError, basic_credentials, parse_basic, refuse_controls, same_secret, unauthorized,
)

K = TypeVar("K", bound=Hashable)

#: The throttle's login for the site token (one secret, one key).
SITE_TOKEN = "token:site"

#: Seconds between two reports of a service's success to the throttle on the
#: hot path (a success keeps its address trusted for ``forget_after``, 15
#: minutes, so once a minute is plenty).
TRUST_REFRESH = 60.0

#: Seconds during which an address's further throttled refusals are counted
#: but not logged, after one was.
THROTTLED_LOG_EVERY = 10.0

#: Why a check failed, as the metric's ``reason`` label says it.
REASONS = ("missing", "empty", "wrong", "throttled", "unconfigured", "unavailable",
           "scope", "expired")


# -- the throttle -----------------------------------------------------------


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

    def prune(self, now: float) -> bool:
        """Forget stale records from the least recently touched end; whether none is left."""
        records = self._records
        while records:
            record = next(iter(records.values()))
            if now - record.last <= self.forget_after or record.next_slot > now:
                return False
            records.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._records)


class Throttle:
    """Delays, spaces out and past a bound refuses repeated failures.

    Use: ``wait = throttle.before(login, client)``; if ``wait`` is None the
    attempt is refused without being checked; otherwise it may be checked
    ``wait`` seconds from now, and its outcome is reported with
    ``throttle.after(login, client, succeeded)``. The keys and the rules
    are described in this module's docstring:

    ``(login, client)``
        none for the first ``free`` failures, then ``base`` doubling per
        failure up to ``max_delay``; concurrent attempts reserve slots one
        delay apart; a slot more than ``max_delay`` ahead is refused. A
        success resets the pair.
    ``login``
        after ``login_free`` failures, delays (never refuses, never reserves)
        attempts from clients that have not logged in as that user within
        ``forget_after`` seconds.
    ``client``
        after ``client_free`` failures, reserves slots and refuses like the
        pair, except for pairs that succeeded lately; a success does not
        reset it. Password checks in flight (``before(..., track=True)``
        until :meth:`release`) count as failures once the address has
        failed at all, and past ``client_in_flight`` at once.

    Each key forgets its failures ``forget_after`` seconds after the last one.
    """

    def __init__(self, clock: IReactorTime, base: float = 0.25, max_delay: float = 15.0,
                 free: int = 1, login_free: int = 3, client_free: int = 10,
                 forget_after: float = 900.0, max_keys: int = 100_000,
                 client_in_flight: int = 32) -> None:
        self.clock = clock
        self.client_in_flight = client_in_flight
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
        #: Password checks admitted and not yet over, by client (bounded by
        #: the checks running at once: an entry goes when it reaches 0).
        self._in_flight: dict[str, int] = {}
        #: Told of each outcome other instances must learn (every failure,
        #: and a success that cleared a pair's failures), as ``(login key,
        #: client, succeeded)``: :class:`mailhub.shared_throttle.ThrottleSync`
        #: writes them to the database. A plain success is never told.
        self.outcomes: Callable[[str, str, bool], None] | None = None

    @staticmethod
    def _login_key(login: str) -> str:
        return login.strip().casefold()[:256]

    def _delay(self, failures: int, free: int) -> float:
        """``base * 2**(failures - free - 1)`` once past ``free``, capped."""
        over = failures - free - 1
        if over < 0:
            return 0.0
        return min(self.max_delay, self.base * (2.0 ** min(over, 64)))

    def _login_wait(self, login: str, trusted: bool, now: float) -> float:
        """The per-login delay (which never refuses)."""
        if trusted:
            return 0.0
        record = self._logins.get(login, now)
        return self._delay(record.failures, self.login_free) if record is not None else 0.0

    def _client_record(self, client: str, trusted: bool, now: float,
                       flying: int = 0) -> _Record | None:
        """The client's record when its budget applies to this attempt.

        ``flying`` checks still in progress count as failures here: a burst
        of parallel attempts is spaced out before its first failures are
        known.
        """
        if trusted:
            return None
        record = self._clients.get(client, now)
        failures = record.failures if record is not None else 0
        # Checks in flight count as failures once the address has failed
        # at all; before that, only past client_in_flight (a legitimate
        # burst of logins from one address, a NAT or MailStore, goes on).
        if failures + (flying if failures else 0) <= self.client_free \
                and flying < self.client_in_flight:
            return None
        return record if record is not None else self._clients.touch(client, now)

    def delay_of(self, login: str, client: str) -> float:
        """The delay an attempt would get now, without reserving anything."""
        now = self.clock.seconds()
        login = self._login_key(login)
        trusted = self._trusted.get((login, client), now) is not None
        waits = [0.0, self._login_wait(login, trusted, now)]
        pair = self._pairs.get((login, client), now)
        if pair is not None:
            waits.append(pair.next_slot - now)
        record = self._client_record(client, trusted, now)
        if record is not None:
            waits.append(record.next_slot - now)
        return min(self.max_delay, max(waits))

    def before(self, login: str, client: str, track: bool = False) -> float | None:
        """Seconds to wait before checking this attempt, or None to refuse it.

        While the pair (or, past its budget, the client) has failures, each
        attempt reserves its next slot, so concurrent attempts are spaced
        out; one whose slot lies more than ``max_delay`` ahead is refused.
        With ``track`` (checks that take time: passwords) an admitted attempt
        counts as in flight until :meth:`release`, and the client's budget
        counts the checks in flight as failures.
        """
        if not track and not (self._pairs or self._clients or self._logins):
            return 0.0  # nothing failed lately: the common case stays cheap
        now = self.clock.seconds()
        login = self._login_key(login)
        trusted = self._trusted.get((login, client), now) is not None
        pair = self._pairs.get((login, client), now)
        if pair is None or pair.failures <= self.free:
            pair = None
        flying = self._in_flight.get(client, 0) if track else 0
        client_record = self._client_record(client, trusted, now, flying)
        # Both looked at before either is reserved: a refusal reserves nothing.
        starts = []
        for record in (pair, client_record):
            if record is not None:
                start = max(now, record.next_slot)
                if start - now > self.max_delay:
                    return None
                starts.append(start)
        if pair is not None:
            pair.next_slot = max(now, pair.next_slot) + self._delay(pair.failures, self.free)
        if client_record is not None:
            # Reserved as if this attempt and those in flight will fail.
            client_record.next_slot = max(now, client_record.next_slot) + self._delay(
                client_record.failures + flying + 1, self.client_free)
        if track:
            self._in_flight[client] = flying + 1
        waits = [0.0, self._login_wait(login, trusted, now)] + [s - now for s in starts]
        return min(self.max_delay, max(waits))

    def quiet(self) -> bool:
        """Whether no pair and no client has failures on record: nobody can be refused."""
        if not (self._pairs._records or self._clients._records):
            return True
        now = self.clock.seconds()
        return self._pairs.prune(now) & self._clients.prune(now)

    def release(self, client: str) -> None:
        """A check admitted by ``before(..., track=True)`` is over, whatever its outcome."""
        flying = self._in_flight.get(client, 0)
        if flying <= 1:
            self._in_flight.pop(client, None)
        else:
            self._in_flight[client] = flying - 1

    def after(self, login: str, client: str, succeeded: bool) -> None:
        """Record the outcome of a checked attempt."""
        now = self.clock.seconds()
        login = self._login_key(login)
        key = (login, client)
        if succeeded:
            if self._pairs:
                if self.outcomes is not None and self._pairs.get(key, now) is not None:
                    # Other instances hold this pair's failures too.
                    self.outcomes(login, client, True)
                self._pairs.drop(key)
            self._trusted.touch(key, now).last = now
            return
        if self.outcomes is not None:
            self.outcomes(login, client, False)
        pair = self._pairs.touch(key, now)
        pair.failures += 1
        pair.last = now
        pair.next_slot = max(pair.next_slot, now + self._delay(pair.failures, self.free))
        record = self._logins.touch(login, now)
        record.failures += 1
        record.last = now
        record = self._clients.touch(client, now)
        record.failures += 1
        record.last = now
        record.next_slot = max(record.next_slot,
                               now + self._delay(record.failures, self.client_free))

    def shared(self, login: str, client: str, failures: int = 0,
               succeeded: bool = False) -> None:
        """Apply what another instance recorded (read from the database).

        ``succeeded``: that instance saw ``login`` succeed from ``client``
        after failures (the pair is reset and trusted here too); then
        ``failures`` failed checks. Each remote failure counts as a local
        one, and moves the pair's and the client's next slot one delay
        further, as the attempt would have reserved it here: so guesses
        spread over instances are spaced out as if they had all come to
        this one.
        """
        now = self.clock.seconds()
        login = self._login_key(login)
        key = (login, client)
        if succeeded:
            self._pairs.drop(key)
            self._trusted.touch(key, now).last = now
        # Past 64 the delays are long capped: no need to loop further.
        for _ in range(min(failures, 64)):
            pair = self._pairs.touch(key, now)
            pair.failures += 1
            pair.last = now
            pair.next_slot = max(now, pair.next_slot) + self._delay(pair.failures, self.free)
            record = self._logins.touch(login, now)
            record.failures += 1
            record.last = now
            record = self._clients.touch(client, now)
            record.failures += 1
            record.last = now
            record.next_slot = max(now, record.next_slot) + self._delay(
                record.failures, self.client_free)

    def sizes(self) -> dict[str, int]:
        """Entries per table (for metrics and the tests of the memory bound)."""
        return {"pairs": len(self._pairs), "logins": len(self._logins),
                "clients": len(self._clients), "trusted": len(self._trusted)}


# -- outcomes -----------------------------------------------------------------


class Refused(Exception):
    """A secret was not accepted, for ``reason`` (one of :data:`REASONS`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def client_of(request: IRequest) -> str:
    """The client key of a request: its peer's host address."""
    address = request.getClientAddress()
    return str(getattr(address, "host", "") or "unknown")


def is_loopback(request: IRequest) -> bool:
    """Whether the peer is on a loopback address."""
    host = getattr(request.getClientAddress(), "host", None)
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class Auth:
    """The shared parts of every check: the throttle, the metric, events, the log.

    One per process (tap.py builds it), handed to every surface. ``hub``
    receives ``login:*`` events; ``clock`` times the waits.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, metrics: Metrics, hub: Hub | None = None,
                 throttle: Throttle | None = None) -> None:
        self.clock = clock
        self.hub = hub if hub is not None else Hub()
        self.throttle = throttle if throttle is not None else Throttle(clock)
        self._failures = metrics.counter(
            "mailhub_auth_failures_total",
            "Secrets refused, by surface and reason (%s)" % ", ".join(REASONS),
            ["surface", "reason"])
        self._successes = metrics.counter(
            "mailhub_auth_successes_total", "Secrets accepted, by surface", ["surface"])
        self._children: dict[tuple[str, str], Any] = {}
        #: Client -> [until when its throttled refusals are not logged, how many were not].
        self._throttled_log: dict[str, list[Any]] = {}

    def _child(self, surface: str, reason: str) -> Any:
        child = self._children.get((surface, reason))
        if child is None:
            child = self._children[(surface, reason)] = (
                self._successes.labels(surface) if reason == "success"
                else self._failures.labels(surface, reason))
        return child

    def succeeded(self, surface: str) -> None:
        """Count one accepted secret."""
        self._child(surface, "success").inc()

    def failed(self, surface: str, reason: str, client: str, login: str | None = None) -> None:
        """Count and log one refused secret (never the secret itself).

        Refusals of an address over its budget (``throttled``) come in
        floods: after one is logged, the next ``THROTTLED_LOG_EVERY`` seconds
        of that address's are counted, and the next line says how many.
        """
        self._child(surface, reason).inc()
        suppressed = 0
        if reason == "throttled":
            now = self.clock.seconds()
            quiet = self._throttled_log.get(client)
            if quiet is not None and now < quiet[0]:
                quiet[1] += 1
                return
            suppressed = quiet[1] if quiet is not None else 0
            if len(self._throttled_log) >= 10_000:
                self._throttled_log.clear()
            self._throttled_log[client] = [now + THROTTLED_LOG_EVERY, 0]
        if login is None:
            self.log.info("{surface}: secret refused from {client}: {reason}",
                          surface=surface, client=client, reason=reason,
                          suppressed=suppressed)
        else:
            self.log.info("{surface}: login for {user!r} from {client} refused: {reason}",
                          surface=surface, user=login[:256], client=client, reason=reason,
                          suppressed=suppressed)
        if suppressed:
            self.log.info("{client}: {suppressed} more refusals (throttled) not logged",
                          client=client, suppressed=suppressed)

    def wait(self, seconds: float) -> "Deferred[None]":
        """A Deferred firing ``seconds`` from now on the clock (at once for 0)."""
        if seconds <= 0:
            return succeed(None)
        return deferLater(self.clock, seconds, lambda: None)

    # -- cheap secrets (tokens, static credentials) ------------------------------

    def admit(self, surface: str, key: str, client: str) -> float | None:
        """Ask the throttle about one attempt on a cheap secret.

        The wait of its slot, or None when the client is over its budget
        (counted and logged as ``throttled``: answer at once, unchecked).
        """
        wait = self.throttle.before(key, client)
        if wait is None:
            self.failed(surface, "throttled", client)
        return wait

    def settle(self, surface: str, key: str, client: str, ok: bool, wait: float,
               *, slow_answers: bool = False, count_success: bool = True,
               reason: str = "wrong") -> float | None:
        """Record a checked cheap secret: None if accepted, else the refusal's wait.

        The secret was compared at once (it is cheap): the right one is
        answered without waiting. A wrong one, counted and logged, is
        answered at once, or with ``slow_answers`` after the delay it earned.
        The throttle's slots bound the rate of checked guesses either way.
        """
        self.throttle.after(key, client, ok)
        if ok:
            if count_success:
                self.succeeded(surface)
            return None
        self.failed(surface, reason, client)
        if not slow_answers:
            return 0.0
        return max(wait, self.throttle.delay_of(key, client))

    def compare(self, surface: str, key: str, client: str, matches: Callable[[], bool],
                *, slow_answers: bool = False, count_success: bool = True) -> float | None:
        """:meth:`admit`, ``matches()``, :meth:`settle`: None if accepted.

        Otherwise the seconds before answering the refusal. A client over its
        budget is refused without ``matches`` being called.
        """
        wait = self.admit(surface, key, client)
        if wait is None:
            return 0.0
        return self.settle(surface, key, client, matches(), wait, slow_answers=slow_answers,
                           count_success=count_success)

    # -- passwords -------------------------------------------------------------

    async def login(self, surface: str, users: IUserSource, login: str, password: str,
                    client: str, *, max_wait: float | None = None,
                    slow_answers: bool = False) -> User | None:
        """One password login: throttle, user source, count, publish, log.

        The user, or None for a failure (already counted, logged and
        published as ``login:failure``; with ``slow_answers`` after the
        delay it earned). ``max_wait`` refuses, without a check, an attempt
        that would have to wait longer. Unavailable (the user source could
        not be asked) is counted and raised.
        """
        if not login.strip() or not password:
            self._login_failed(surface, login, client, "empty")
            return None
        throttle = self.throttle
        wait: float | None = None
        # With max_wait, looked at before reserving: a wait the surface will
        # not make must not take a slot either.
        if max_wait is None or throttle.delay_of(login, client) <= max_wait:
            wait = throttle.before(login, client, track=True)
            if wait is not None and max_wait is not None and wait > max_wait:
                throttle.release(client)
                wait = None
        if wait is None:
            self._login_failed(surface, login, client, "throttled")
            return None
        try:
            if wait > 0:
                await self.wait(wait)
            try:
                user: User | None = await users.authenticate(login, password)
            except Unavailable:
                self.failed(surface, "unavailable", client, login)
                raise
        finally:
            throttle.release(client)
        throttle.after(login, client, user is not None)
        if user is None:
            self._login_failed(surface, login, client, "wrong")
            if slow_answers:
                await self.wait(throttle.delay_of(login, client))
            return None
        self.succeeded(surface)
        publish(self.hub, *login_event(True, user.login, surface, client, self.clock.seconds()))
        return user

    def _login_failed(self, surface: str, login: str, client: str, reason: str) -> None:
        self.failed(surface, reason, client, login)
        if login.strip():
            publish(self.hub, *login_event(False, login, surface, client,
                                           self.clock.seconds()))


# -- checkers: what a surface holds ------------------------------------------------


class Checker(Protocol):
    """What :func:`requires` asks: accept a request (and say who) or refuse it."""

    async def authorise(self, request: IRequest) -> Any:
        """What the request proved (a User, or None), or raise the refusal's HTTPError."""


class PasswordLogin:
    """Users' Basic credentials, checked against a user source (the event stream)."""

    def __init__(self, auth: Auth, surface: str, users: IUserSource, realm: str,
                 slow_answers: bool = True) -> None:
        self.auth = auth
        self.surface = surface
        self.users = users
        self.realm = realm
        self.slow_answers = slow_answers

    async def authorise(self, request: IRequest) -> User:
        """The user the request's Basic credentials belong to; 401 otherwise."""
        given = basic_credentials(request)
        client = client_of(request)
        if given is None or not given[1]:
            # Not a guess at anyone's password (clients ask without
            # credentials first): counted, never published nor throttled.
            self.auth.failed(self.surface, "missing" if given is None else "empty", client)
            raise unauthorized(self.realm)
        user = await self.auth.login(self.surface, self.users, given[0], given[1], client,
                                     slow_answers=self.slow_answers)
        if user is None:
            raise unauthorized(self.realm)
        return user


class StaticBasic:
    """One service account's Basic credentials (Dovecot's push, MailStore's).

    The expected header is computed once and compared in constant time, so
    the sender's exact header (Dovecot's) needs no decoding; any other header
    is decoded and both parts compared, each in constant time. With either
    part unset every request is refused (``unconfigured``), except from
    loopback peers when ``allow_loopback`` is true. Accepting costs no
    Deferred: :meth:`check` is synchronous.
    """

    log = Logger()

    def __init__(self, auth: Auth, surface: str, key: str, username: str, password: str,
                 realm: str, allow_loopback: bool = False) -> None:
        self.auth = auth
        self.surface = surface
        self.key = key
        self.username = username
        self.password = password
        self.realm = realm
        self.allow_loopback = allow_loopback
        self.configured = bool(username and password)
        self._expected = b"Basic " + base64.b64encode(
            ("%s:%s" % (username, password)).encode("utf-8"))
        self._warned = False
        #: When a success on the hot path should next be told to the throttle.
        self._next_trust = 0.0

    def check(self, request: IRequest) -> float | None:
        """None when the request may go on; else the seconds before answering 401."""
        header = request.getHeader(b"authorization")
        if (header is not None and self.configured and self.auth.throttle.quiet()
                and hmac.compare_digest(header, self._expected)):
            # The hot path (every Dovecot delivery): the exact header, and no
            # failure on record anywhere, so nobody could be refused. Once a
            # minute the sender's address is marked as trusted (so an
            # attack from its address later cannot refuse it).
            now = self.auth.clock.seconds()
            if now >= self._next_trust:
                self._next_trust = now + TRUST_REFRESH
                self.auth.throttle.after(self.key, client_of(request), True)
            return None
        client = client_of(request)
        if not self.configured:
            if self.allow_loopback and is_loopback(request):
                return None
            if not self._warned:
                self._warned = True
                self.log.warn("{surface} request refused: its username and password "
                              "are not both set", surface=self.surface)
            self.auth.failed(self.surface, "unconfigured", client)
            return 0.0
        if header is None:
            self.auth.failed(self.surface, "missing", client)
            return 0.0
        return self.auth.compare(self.surface, self.key, client,
                                 functools.partial(self._matches, header), count_success=False)

    def _matches(self, header: bytes) -> bool:
        if hmac.compare_digest(header, self._expected):
            return True  # the exact header the service sends: no decoding needed
        given = parse_basic(header)
        # Both compared every time, in constant time, so timing tells nothing.
        user_ok = same_secret(given[0] if given else "", self.username)
        password_ok = same_secret(given[1] if given else "", self.password)
        return given is not None and user_ok and password_ok

    async def authorise(self, request: IRequest) -> None:
        """Accept the request, or raise 401 after the wait the refusal owes."""
        wait = self.check(request)
        if wait is not None:
            await self.auth.wait(wait)
            raise unauthorized(self.realm)


class SiteToken:
    """The site token and the named tokens (hooks, calendar), read from the
    directory per request.

    ``cached(token)`` answers from memory (a :class:`Grant`, or None when
    unsure) and ``lookup(token)`` asks the store; both compare in constant
    time (a plain ``True`` stands for the site token's grant). A grant
    proves where the token may be used: a named token outside its scopes is
    refused as ``scope``, without being taken for a guess. Wrong tokens are
    answered after the delay they earned (``slow_answers``). ``scope`` is
    the scope this surface checks when :meth:`check` is given none (by
    default the surface's name: ``calendar``).
    """

    log = Logger()

    def __init__(self, auth: Auth, surface: str,
                 lookup: Callable[[str], Awaitable[Grant | bool | None]],
                 cached: Callable[[str], Grant | bool | None] | None = None,
                 slow_answers: bool = True, scope: str | None = None) -> None:
        self.auth = auth
        self.surface = surface
        self._lookup = lookup
        self._cached = cached
        self.slow_answers = slow_answers
        self.scope = scope or surface

    @staticmethod
    def _grant(found: Grant | bool | None) -> Grant | None:
        if found is True:
            return Grant(SITE)
        return found or None

    async def check(self, token: str | None, client: str, scope: str | None = None) -> Grant:
        """The grant of ``token`` if it may be used on ``scope`` (a hook's
        path or name; default :attr:`scope`); else wait, then raise Refused.

        ``None`` is a missing token, ``""`` an empty one: counted and slowed
        like a wrong one, but not a guess (nothing to throttle).
        """
        auth = self.auth
        if not token:
            reason = "missing" if token is None else "empty"
            auth.failed(self.surface, reason, client)
            if self.slow_answers:
                await auth.wait(auth.throttle.delay_of(SITE_TOKEN, client))
            raise Refused(reason)
        try:
            where: str | None = scope_of(scope or self.scope)
        except ValueError:
            where = None  # a surface no named token can be made for
        wait = auth.admit(self.surface, SITE_TOKEN, client)
        if wait is None:
            raise Refused("throttled")
        grant = self._grant(self._cached(token)) if self._cached is not None else None
        if grant is None:
            grant = self._grant(await self._lookup(token))
        if grant is not None and not grant.expired and not grant.allows(where):
            # A real secret, used where it may not be: not a guess, and no
            # success either (it earns the address no trust).
            auth.failed(self.surface, "scope", client)
            self.log.info("{surface}: token {name} from {client} is not allowed on {scope}",
                          surface=self.surface, name=grant.name, client=client, scope=where)
            raise Refused("scope")
        ok = grant is not None and not grant.expired
        if grant is not None and grant.expired:
            self.log.info("{surface}: the previous secret of token {name} from {client} "
                          "refused: its overlap has ended", surface=self.surface,
                          name=grant.name, client=client)
        # Guesses count against the one key of every token; a named token's
        # success trusts the address for that token only, so holding a
        # limited token never spares its holder's guesses at the others.
        key = SITE_TOKEN if grant is None or not ok or grant.name == SITE \
            else "token:" + grant.name
        hold = auth.settle(self.surface, key, client, ok, wait,
                           slow_answers=self.slow_answers,
                           reason="expired" if grant is not None else "wrong")
        if hold is None:
            assert grant is not None
            if grant.previous:
                self.log.info("{surface}: token {name} from {client} used its previous "
                              "secret (valid during the overlap, {left:.0f} s more)",
                              surface=self.surface, name=grant.name, client=client,
                              left=max(0.0, (grant.until or 0.0) - auth.clock.seconds()))
            return grant
        await auth.wait(hold)
        raise Refused("expired" if grant is not None else "wrong")

    async def authorise(self, request: IRequest) -> None:
        """The token from ``Authorization: Bearer`` or ``?token=``; 403 otherwise.

        A token holding a control character is bad input (400), as in every field.
        """
        token = bearer_or_query_token(request)
        if token is not None:
            refuse_controls({"token": token})
        try:
            await self.check(token, client_of(request))
        except Refused:
            raise HTTPError(403, {"error": "a valid site token is required"})


def bearer_or_query_token(request: IRequest) -> str | None:
    """``Authorization: Bearer TOKEN``, else the last ``token`` query value, else None."""
    header = request.getHeader(b"authorization") or b""
    scheme, _, value = header.partition(b" ")
    if scheme.lower() == b"bearer":
        return value.strip().decode("utf-8", "replace")
    values = (request.args or {}).get(b"token") or []
    if not values:
        return None
    return values[-1].decode("utf-8", "replace")


def requires(attribute: str) -> Callable[[Callable[..., Awaitable[Any]]],
                                         Callable[..., Awaitable[Any]]]:
    """Klein handler decorator: ``self.<attribute>`` (a :class:`Checker`) must accept.

    The handler is called as ``handler(self, request, principal, ...)`` with
    what the checker proved; a refusal is raised as its HTTPError (put
    :func:`~mailhub.web.common.handle_errors` outside this decorator).
    """

    def decorate(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(handler)
        async def wrapper(self: Any, request: IRequest, *args: Any, **kw: Any) -> Any:
            checker: Checker = getattr(self, attribute)
            principal = await checker.authorise(request)
            return await handler(self, request, principal, *args, **kw)

        return wrapper

    return decorate


__all__ = [
    "Auth", "Checker", "HTTPError", "PasswordLogin", "REASONS", "Refused", "SITE_TOKEN",
    "SiteToken", "StaticBasic", "Throttle", "client_of", "is_loopback", "requires",
]
