"""The failure throttle slows guessing down and never locks the real user out."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.auth import Throttle


def fail(throttle: Throttle, login: str, client: str, times: int) -> None:
    for _ in range(times):
        throttle.after(login, client, False)


class ThrottleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = Throttle(self.clock, base=0.25, max_delay=15.0, free=1,
                                 login_free=3, client_free=10, forget_after=900.0)

    def test_a_first_attempt_and_a_single_typo_cost_nothing(self) -> None:
        self.assertEqual(self.throttle.before("alice", "10.0.0.1"), 0.0)
        self.throttle.after("alice", "10.0.0.1", False)
        self.assertEqual(self.throttle.before("alice", "10.0.0.1"), 0.0)

    def test_repeated_failures_double_the_delay_up_to_the_cap(self) -> None:
        delays = []
        for _ in range(10):
            self.throttle.after("alice", "10.0.0.1", False)
            delays.append(self.throttle.delay_of("alice", "10.0.0.1"))
        self.assertEqual(delays[:7], [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
        self.assertEqual(delays[7:], [15.0, 15.0, 15.0])

    def test_concurrent_attempts_on_one_pair_are_spaced_out_then_refused(self) -> None:
        fail(self.throttle, "alice", "10.0.0.1", 6)  # pair delay now 4 s
        waits = [self.throttle.before("alice", "10.0.0.1") for _ in range(5)]
        # The first waits out the last failure's delay, each next one a delay
        # more; past max_delay ahead they are refused without a check.
        self.assertEqual(waits, [4.0, 8.0, 12.0, None, None])
        # Another address, same login: not refused.
        self.assertIsNotNone(self.throttle.before("alice", "10.0.0.2"))

    def test_a_success_resets_the_pair(self) -> None:
        fail(self.throttle, "alice", "10.0.0.1", 5)
        self.throttle.after("alice", "10.0.0.1", True)
        self.assertEqual(self.throttle.before("alice", "10.0.0.1"), 0.0)

    def test_an_attacker_elsewhere_never_refuses_the_real_user(self) -> None:
        # The real user logged in from home before the attack.
        self.throttle.after("alice", "192.0.2.7", True)
        for n in range(200):
            client = "203.0.113.%d" % (n % 50)
            self.throttle.before("alice", client)
            self.throttle.after("alice", client, False)
        # From home: no refusal and no delay at all.
        self.assertEqual(self.throttle.before("alice", "192.0.2.7"), 0.0)
        # From an address never seen: delayed (bounded), never refused.
        wait = self.throttle.before("alice", "198.51.100.1")
        self.assertIsNotNone(wait)
        assert wait is not None
        self.assertGreater(wait, 0.0)
        self.assertLessEqual(wait, 15.0)

    def test_one_address_spraying_many_logins_is_slowed_down(self) -> None:
        for n in range(12):
            self.throttle.after("user%d" % n, "203.0.113.9", False)
        self.assertEqual(self.throttle.before("someone-else", "203.0.113.9"), 0.5)
        self.assertEqual(self.throttle.before("someone-else", "198.51.100.1"), 0.0)

    def test_failures_are_forgotten_after_a_quiet_period(self) -> None:
        fail(self.throttle, "alice", "10.0.0.1", 8)
        self.clock.advance(901)
        self.assertEqual(self.throttle.before("alice", "10.0.0.1"), 0.0)
        self.assertEqual(self.throttle.sizes()["pairs"], 0)

    def test_logins_are_compared_case_insensitively(self) -> None:
        fail(self.throttle, "Alice@Example.Test", "10.0.0.1", 4)
        self.assertEqual(self.throttle.delay_of("alice@example.test", "10.0.0.1"), 1.0)

    def test_memory_is_bounded_by_max_keys(self) -> None:
        throttle = Throttle(self.clock, max_keys=100)
        for n in range(1000):
            throttle.after("user%d" % n, "10.0.%d.%d" % (n // 256, n % 256), False)
        self.assertEqual(max(throttle.sizes().values()), 100)


class ClientBudgetTests(SynchronousTestCase):
    """One address over its failure budget is refused at once; others are not."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = Throttle(self.clock)

    def spray(self, client: str, count: int) -> list[float | None]:
        waits = []
        for n in range(count):
            wait = self.throttle.before("random%d" % n, client)
            waits.append(wait)
            if wait is not None:
                self.throttle.after("random%d" % n, client, False)
        return waits

    def test_an_address_spraying_random_logins_is_refused_past_its_budget(self) -> None:
        waits = self.spray("203.0.113.9", 100)
        checked = [w for w in waits if w is not None]
        # Ten free failures, then slots one doubling delay apart, refused
        # once the next slot lies more than max_delay ahead.
        self.assertLess(len(checked), 20)
        self.assertIsNone(waits[-1])
        self.assertIsNone(self.throttle.before("someone-else", "203.0.113.9"))
        # Another address is neither refused nor slowed.
        self.assertEqual(self.throttle.before("someone-else", "198.51.100.1"), 0.0)

    def test_parallel_attempts_from_one_address_are_spaced_not_multiplied(self) -> None:
        self.spray("203.0.113.9", 14)  # client delay now 2 s
        waits = [self.throttle.before("x%d" % n, "203.0.113.9") for n in range(20)]
        admitted = [w for w in waits if w is not None]
        # Each reserved as if it will fail: the next delay (4 s) apart, none
        # more than max_delay ahead; the rest refused.
        self.assertGreaterEqual(admitted[0], 2.0)
        self.assertEqual([b - a for a, b in zip(admitted, admitted[1:])], [4.0, 4.0])
        self.assertLessEqual(max(admitted), 15.0)
        self.assertEqual(waits.count(None), 17)

    def test_a_burst_of_password_checks_counts_those_in_flight(self) -> None:
        # A fresh address opens 100 connections at once: no failure is known
        # yet; up to client_in_flight checks go at once, then it is spaced.
        waits = [self.throttle.before("x%d" % n, "203.0.113.9", track=True)
                 for n in range(100)]
        admitted = [w for w in waits if w is not None]
        self.assertEqual(admitted[:32], [0.0] * 32)
        self.assertLessEqual(len(admitted), 34)
        self.assertEqual(sorted(admitted), admitted)
        # Another address is not refused, and released checks are forgotten.
        self.assertEqual(self.throttle.before("y", "198.51.100.1", track=True), 0.0)
        for _ in admitted:
            self.throttle.release("203.0.113.9")
        self.throttle.release("198.51.100.1")
        self.assertEqual(self.throttle._in_flight, {})

    def test_once_an_address_has_failed_its_checks_in_flight_count(self) -> None:
        self.spray("203.0.113.9", 3)
        waits = [self.throttle.before("x%d" % n, "203.0.113.9", track=True)
                 for n in range(100)]
        admitted = [w for w in waits if w is not None]
        # 3 failures + 8 in flight reach the budget of 10; then doubling slots.
        self.assertEqual(admitted[:8], [0.0] * 8)
        self.assertLessEqual(len(admitted), 14)

    def test_a_legitimate_burst_from_one_address_goes_at_once(self) -> None:
        waits = [self.throttle.before("user%d" % n, "192.0.2.50", track=True)
                 for n in range(30)]
        self.assertEqual(waits, [0.0] * 30)

    def test_the_budget_refills_with_time(self) -> None:
        self.spray("203.0.113.9", 100)
        self.clock.advance(16)
        self.assertIsNotNone(self.throttle.before("someone", "203.0.113.9"))

    def test_a_user_who_logged_in_from_that_address_is_not_refused(self) -> None:
        self.throttle.after("alice", "203.0.113.9", True)
        self.spray("203.0.113.9", 100)
        self.assertEqual(self.throttle.before("alice", "203.0.113.9"), 0.0)

    def test_a_success_does_not_reset_the_budget(self) -> None:
        self.spray("203.0.113.9", 100)
        self.throttle.after("mallory", "203.0.113.9", True)
        self.assertIsNone(self.throttle.before("victim", "203.0.113.9"))


class QuietTests(SynchronousTestCase):
    def test_quiet_until_a_failure_and_again_once_it_is_forgotten(self) -> None:
        clock = Clock()
        throttle = Throttle(clock)
        self.assertTrue(throttle.quiet())
        throttle.after("alice", "10.0.0.1", True)
        self.assertTrue(throttle.quiet())  # successes are not failures
        throttle.after("alice", "10.0.0.1", False)
        self.assertFalse(throttle.quiet())
        clock.advance(throttle.forget_after + 1)
        self.assertTrue(throttle.quiet())
        self.assertEqual(throttle.sizes()["pairs"], 0)
