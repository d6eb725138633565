"""The in-memory directory answers from memory and follows the store's changes."""

from __future__ import annotations

from typing import Any, Coroutine

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.directory.memory import MemoryStore
from mailhub.directory.model import Added, Email, Group, Left, Profile, new_profile_id
from mailhub.directory.service import Directory
from mailhub.errors import ValidationError
from mailhub.pubsub import Hub


class DirectoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = MemoryStore()
        self.clock = Clock()
        self.directory = Directory(self.store, self.clock, poll_interval=0.25)
        self.wait(self.directory.load())
        self.directory.startService()
        self.addCleanup(self.directory.stopService)

    def wait(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return self.successResultOf(Deferred.fromCoroutine(coroutine))

    def test_a_token_set_elsewhere_is_accepted_at_once(self) -> None:
        self.successResultOf(self.store.set_token("A" * 32))
        # No poll has run yet, and still the new token works.
        self.assertTrue(self.wait(self.directory.check_token("A" * 32)))
        self.assertFalse(self.wait(self.directory.check_token("B" * 32)))
        self.assertFalse(self.wait(self.directory.check_token("")))

    def test_an_old_token_is_refused_after_the_next_poll(self) -> None:
        self.successResultOf(self.store.set_token("A" * 32))
        self.clock.advance(0.25)
        self.assertTrue(self.directory.check_token_cached("A" * 32))
        self.successResultOf(self.store.set_token("B" * 32))
        self.clock.advance(0.25)
        self.assertFalse(self.wait(self.directory.check_token("A" * 32)))
        self.assertTrue(self.wait(self.directory.check_token("B" * 32)))

    def test_a_rotation_seen_in_the_change_log_is_published_without_the_token(self) -> None:
        hub = Hub()
        seen: list[object] = []
        hub.global_.topic("token:rotated").subscribe(seen.append)
        self.directory.hub = hub
        self.successResultOf(self.store.set_token("C" * 32))
        self.clock.advance(0.25)
        self.assertEqual(seen, [{"site": "main"}])

    def test_change_hooks_see_each_change_after_it_is_applied(self) -> None:
        seen: list[tuple[str, str, bool]] = []
        self.directory.on_change.append(
            lambda kind, key: seen.append((kind, key, self.directory.lookup(key) is not None)))
        self.directory.on_change.insert(0, lambda kind, key: 1 / 0)  # a broken hook
        profile = Profile(new_profile_id(), "A Person",
                          emails=(Email("a@example.com", True, True),))
        self.successResultOf(self.store.create_profile(profile))
        self.clock.advance(0.25)
        self.assertEqual(seen, [("profile", profile.id, True)])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_profiles_written_elsewhere_appear_after_a_poll(self) -> None:
        profile = Profile(new_profile_id(), "A Person",
                          emails=(Email("a@example.com", True, True),))
        self.successResultOf(self.store.create_profile(profile))
        self.assertIsNone(self.directory.lookup("a@example.com"))
        self.clock.advance(0.25)
        self.assertEqual(self.directory.lookup("A@EXAMPLE.COM").id, profile.id)
        self.successResultOf(self.store.remove_profile(profile.id))
        self.clock.advance(0.25)
        self.assertIsNone(self.directory.lookup("a@example.com"))
        self.assertIsNone(self.directory.lookup(profile.id))

    def test_a_miss_is_checked_against_the_store(self) -> None:
        profile = Profile(new_profile_id(), "A Person",
                          emails=(Email("a@example.com", True, True),))
        self.successResultOf(self.store.create_profile(profile))
        self.assertEqual(self.wait(self.directory.find("a@example.com")).id, profile.id)
        self.assertEqual(self.wait(self.directory.find(profile.id)).id, profile.id)
        self.assertIsNone(self.wait(self.directory.find("nobody@example.com")))

    def test_add_member_statuses(self) -> None:
        self.successResultOf(self.store.create_group(Group("example", "Example")))
        status, profile = self.wait(self.directory.add_member("example", "a@example.com", "A"))
        self.assertEqual(status, Added.NEW_PROFILE)
        self.assertEqual(profile.groups, ("example",))
        status, again = self.wait(self.directory.add_member("example", "A@example.com", "A"))
        self.assertEqual((status, again.id), (Added.ALREADY_MEMBER, profile.id))
        self.successResultOf(self.store.create_group(Group("other", "Other")))
        status, _ = self.wait(self.directory.add_member("other", "a@example.com", "A"))
        self.assertEqual(status, Added.EXISTING_PROFILE)
        self.assertEqual(self.directory.lookup(profile.id).groups, ("example", "other"))

    def test_adding_verifies_an_unverified_address(self) -> None:
        self.successResultOf(self.store.create_group(Group("example", "Example")))
        profile = Profile(new_profile_id(), "A Person",
                          emails=(Email("a@example.com", True, True),
                                  Email("b@example.com", False, False)))
        self.successResultOf(self.store.create_profile(profile))
        status, after = self.wait(self.directory.add_member("example", "b@example.com", "A"))
        self.assertEqual(status, Added.EXISTING_PROFILE)
        self.assertEqual(after.unverified, [])

    def test_adding_to_an_unknown_group_is_a_validation_error(self) -> None:
        failure = self.failureResultOf(Deferred.fromCoroutine(
            self.directory.add_member("nope", "a@example.com", "A")))
        failure.trap(ValidationError)

    def test_leave_statuses(self) -> None:
        self.successResultOf(self.store.create_group(Group("example", "Example")))
        _, profile = self.wait(self.directory.add_member("example", "a@example.com", "A"))
        self.assertEqual(self.wait(self.directory.leave("nope", profile.id)), Left.NO_SUCH_GROUP)
        self.assertEqual(self.wait(self.directory.leave("example", "nobody")), Left.NO_SUCH_USER)
        self.assertEqual(self.wait(self.directory.leave("example", profile.id)), Left.LEFT)
        self.assertEqual(self.wait(self.directory.leave("example", profile.id)), Left.NOT_A_MEMBER)
        self.assertEqual(self.directory.lookup(profile.id).groups, ())


class FirstStartTests(SynchronousTestCase):
    """While the profile table loads, the groups and tokens are followed already."""

    def test_a_token_rotated_while_the_table_loads_is_followed_and_announced_once(
            self) -> None:
        store = MemoryStore()
        self.successResultOf(store.set_token("A" * 32))
        held: Deferred[None] = Deferred()
        load_table = store.load_table
        store.load_table = lambda: held.addCallback(  # type: ignore[method-assign]
            lambda _: load_table())
        clock = Clock()
        hub = Hub()
        seen: list[object] = []
        hub.global_.topic("token:rotated").subscribe(seen.append)
        directory = Directory(store, clock, poll_interval=0.25, hub=hub)
        changed: list[tuple[str, str]] = []
        directory.on_change.append(lambda kind, key: changed.append((kind, key)))
        loading = Deferred.fromCoroutine(directory.load())
        directory.startService()
        self.addCleanup(directory.stopService)
        self.assertTrue(directory.answering)
        self.assertFalse(directory.loaded)
        self.successResultOf(store.set_token("B" * 32))
        profile = Profile(new_profile_id(), "A Person",
                          emails=(Email("a@example.com", True, True),))
        self.successResultOf(store.create_profile(profile))
        clock.advance(0.25)
        # The old token is refused from memory, before the table is there.
        self.assertIsNone(directory.check_token_cached("A" * 32))
        self.assertIsNotNone(directory.check_token_cached("B" * 32))
        self.assertEqual(seen, [{"site": "main"}])
        self.assertIn(("profile", profile.id), changed)
        self.assertIsNone(directory.profile(profile.id))  # memory answers nobody yet
        held.callback(None)
        self.successResultOf(loading)
        clock.advance(0.25)
        self.assertEqual(directory.profile(profile.id), profile)
        self.assertEqual(seen, [{"site": "main"}])  # the catch-up announces nothing again

    def test_work_handed_over_before_the_table_is_loaded_waits_for_it(self) -> None:
        store = MemoryStore()
        held: Deferred[None] = Deferred()
        load_table = store.load_table
        store.load_table = lambda: held.addCallback(  # type: ignore[method-assign]
            lambda _: load_table())
        directory = Directory(store, Clock())
        seen: list[tuple[bytes, bool]] = []

        def handle(body: bytes) -> Deferred[str]:
            seen.append((body, directory.loaded))
            return succeed("done")

        handle_loaded = directory.after_load(handle)
        early = handle_loaded(b"first")  # the broker's consumer runs before the start-up
        loading = Deferred.fromCoroutine(directory.load())
        second = handle_loaded(b"second")
        self.assertEqual(seen, [])
        self.assertNoResult(early)
        held.callback(None)
        self.successResultOf(loading)
        self.assertEqual((self.successResultOf(early), self.successResultOf(second)),
                         ("done", "done"))
        self.assertEqual(self.successResultOf(handle_loaded(b"third")), "done")
        self.assertEqual(seen, [(b"first", True), (b"second", True), (b"third", True)])
