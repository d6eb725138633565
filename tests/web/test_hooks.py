"""The GroupServer hooks through StubTreq over the real Klein resource.

Each test builds a Directory on the in-memory store (the real SQL on an
in-memory SQLite database, run inline), so what is proved here is what the
hooks do against the store production uses.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import attrs
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.auth import SITE_TOKEN, Throttle
from mailhub.config import Config, HooksSection, MailhubSection
from mailhub.directory.service import Directory
from mailhub.directory.memory import MemoryStore
from mailhub.directory.model import Email, Group, Profile
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.web.hooks import HOOKS, GroupHooks
from mailhub.web.openapi import site_document
from tests.support.auth import auth_failures

TOKEN = "0123456789abcdefghijABCDEFGHIJ01"
SITE = "https://groups.example.com"
BASE = "http://127.0.0.1"
FORM = {b"content-type": [b"application/x-www-form-urlencoded"]}

ALICE = Profile(
    id="qK7SgjsTHcLNrJ2ClevcJ0", name="A Person", nickname="aperson",
    emails=(Email("a.person@home.example.com", True, True),
            Email("a.person@work.example.com", True, False),
            Email("old@example.org", False, False)))
BOB = Profile(id="HgTvjLrc7ecJNK0JCs2lSq", name="Bob Builder",
              emails=(Email("bob@example.com", True, True),))
UNDER = Profile(id="UnderScore000000000000", name="Under Score",
                emails=(Email("a_b@example.com", True, True),))


class HooksCase(SynchronousTestCase):
    """A site with a token, two groups and three profiles."""

    #: ``[hooks] status_codes`` of the site.
    status_codes = "http"

    def setUp(self) -> None:
        self.store = MemoryStore()
        self.clock = Clock()
        self.ok(self.store.set_token(TOKEN))
        self.ok(self.store.create_group(Group("example", "Example", "example@groups.example.com",
                                              "discussion", "public")))
        self.ok(self.store.create_group(Group("test", "Test", "test@groups.example.com",
                                              "announcement", "secret")))
        for profile in (ALICE, BOB, UNDER):
            self.ok(self.store.create_profile(profile))
        self.ok(self.store.add_member("example", ALICE.id))
        self.ok(self.store.add_member("test", ALICE.id))
        self.ok(self.store.add_member("example", UNDER.id))
        self.directory = Directory(self.store, self.clock)
        self.ok(Deferred.fromCoroutine(self.directory.load()))
        self.metrics = Metrics()
        self.hub = Hub()
        self.events: list[tuple[str, Any]] = []
        for topic in ("member:added", "member:left", "profile:created"):
            self.hub.local.topic(topic).subscribe(
                lambda data, topic=topic: self.events.append((topic, data)))
        config = Config(mailhub=MailhubSection(site_url=SITE + "/", max_body=1024 * 1024),
                        hooks=HooksSection(status_codes=self.status_codes))
        self.hooks = GroupHooks(self.directory, config, self.metrics, self.hub)
        self.http = StubTreq(self.hooks.resource())

    def ok(self, d: Any) -> Any:
        return self.successResultOf(d)

    def call(self, path: str, fields: dict[str, str] | None = None, method: str = "POST",
             query: str = "", body: bytes | None = None,
             headers: dict[bytes, list[bytes]] | None = None) -> tuple[int, Any]:
        """Send a request; (status, JSON body). Fails the test on a non-JSON reply."""
        url = BASE + path + ("?" + query if query else "")
        if body is None and fields is not None:
            body = urlencode(fields).encode("utf-8")
        d = self.http.request(method, url, data=body, headers=headers or FORM)
        self.http.flush()
        response = self.ok(d)
        raw = self.ok(response.content())
        ctype = response.headers.getRawHeaders(b"content-type", [b""])[0]
        self.assertTrue(ctype.startswith(b"application/json"), (response.code, ctype, raw))
        return response.code, json.loads(raw)

    def search(self, user: str, token: str = TOKEN) -> tuple[int, Any]:
        return self.call("/gs-search-people.json", {"token": token, "user": user, "search": ""})

    def audit(self) -> list[dict[str, str]]:
        return self.ok(self.store.audit_log(100))  # type: ignore[no-any-return]


def alice_data() -> dict[str, Any]:
    return {
        "id": "qK7SgjsTHcLNrJ2ClevcJ0",
        "name": "A Person",
        "url": "https://groups.example.com/p/aperson",
        "groups": ["example", "test"],
        "email": {
            "all": ["a.person@home.example.com", "a.person@work.example.com", "old@example.org"],
            "preferred": ["a.person@home.example.com"],
            "other": ["a.person@work.example.com"],
            "unverified": ["old@example.org"],
        },
    }


class SelfDescriptionTests(HooksCase):
    def test_every_hook_describes_itself_without_an_action_or_token(self) -> None:
        for path, spec in HOOKS.items():
            status, body = self.call(path, {})
            self.assertEqual(status, 200, path)
            self.assertEqual(body["message"], ["", spec.label])
            self.assertIn("token", body["arguments"])
            self.assertEqual(body["arguments"]["token"],
                             {"Description": "The authentication token", "Required": True})

    def test_add_hook_lists_its_action_and_fields(self) -> None:
        status, body = self.call("/gs-group-member-add.json", method="GET")
        self.assertEqual(status, 200)
        self.assertEqual(body["actions"], {"add": "Add"})
        self.assertEqual({k: v["Required"] for k, v in body["arguments"].items()},
                         {"token": True, "groupId": True, "email": True, "fn": True,
                          "biography": False, "tz": False})

    def test_site_members_hook_lists_both_actions(self) -> None:
        status, body = self.call("/gs-site-member-list.json", {"token": TOKEN})
        self.assertEqual(body["actions"], {"users": "Users", "user_groups": "User groups"})

    def test_unknown_parameter_is_no_action(self) -> None:
        status, body = self.call("/gs-search-people.json", {"token": TOKEN, "find": ""})
        self.assertEqual(status, 200)
        self.assertEqual(body["actions"], {"search": "Search"})


class GroupsHookTests(HooksCase):
    def test_get_lists_every_group_with_string_ids(self) -> None:
        status, body = self.call("/gs-group-groups.json", {"token": TOKEN, "get": ""})
        self.assertEqual(status, 200)
        self.assertEqual(body, [
            {"id": "example", "name": "Example", "url": SITE + "/groups/example",
             "email": "example@groups.example.com", "type": "Discussion group",
             "privacy": "public"},
            {"id": "test", "name": "Test", "url": SITE + "/groups/test",
             "email": "test@groups.example.com", "type": "Announcement group",
             "privacy": "secret"},
        ])

    def test_type_is_groupserver_title_of_every_group_type(self) -> None:
        # gs.group.type.{discussion,announcement,support,closed}: the titles
        # GroupServer's hook answers; a value mailhub does not know passes as stored.
        for stored in ("support", "closed", "Closed group", "custom"):
            self.ok(self.store.create_group(Group("g-" + stored.replace(" ", "-"), "G",
                                                  type=stored)))
        status, body = self.call("/gs-group-groups.json", {"token": TOKEN, "get": ""})
        self.assertEqual(status, 200)
        types = {g["id"]: g["type"] for g in body}
        self.assertEqual(types, {"example": "Discussion group", "test": "Announcement group",
                                 "g-support": "Support group", "g-closed": "Closed group",
                                 "g-Closed-group": "Closed group", "g-custom": "custom"})
        # The store keeps mailhub's short names.
        self.assertEqual(self.directory.group("g-support").type, "support")

    def test_group_made_elsewhere_is_listed_at_once(self) -> None:
        self.ok(self.store.create_group(Group("fresh", "Fresh")))
        status, body = self.call("/gs-group-groups.json", {"token": TOKEN, "get": ""})
        self.assertEqual([g["id"] for g in body], ["example", "fresh", "test"])

    def test_get_works_as_a_get_with_a_bare_action_in_the_query(self) -> None:
        status, body = self.call("/gs-group-groups.json", method="GET",
                                 query="token=%s&get" % TOKEN)
        self.assertEqual(status, 200)
        self.assertEqual([g["id"] for g in body], ["example", "test"])

    def test_query_and_body_both_count(self) -> None:
        status, body = self.call("/gs-group-groups.json", {"token": TOKEN}, query="get=Get")
        self.assertEqual(status, 200)
        self.assertEqual(len(body), 2)

    def test_json_body_is_accepted(self) -> None:
        status, body = self.call("/gs-group-groups.json",
                                 body=json.dumps({"token": TOKEN, "get": True}).encode(),
                                 headers={b"content-type": [b"application/json"]})
        self.assertEqual(status, 200)
        self.assertEqual(len(body), 2)


class SearchHookTests(HooksCase):
    def test_search_by_id(self) -> None:
        self.assertEqual(self.search(ALICE.id), (200, alice_data()))

    def test_search_by_any_address_case_insensitively(self) -> None:
        for address in ("a.person@home.example.com", "A.Person@WORK.example.com",
                        "old@example.org"):
            self.assertEqual(self.search(address), (200, alice_data()), address)

    def test_search_by_name_and_address_form(self) -> None:
        self.assertEqual(self.search("A Person <a.person@home.example.com>"),
                         (200, alice_data()))

    def test_unknown_person_is_an_empty_object(self) -> None:
        self.assertEqual(self.search("nobody@example.com"), (200, {}))
        self.assertEqual(self.search("NoSuchId"), (200, {}))

    def test_percent_and_underscore_are_no_wildcards(self) -> None:
        self.assertEqual(self.search("a%@example.com"), (200, {}))
        self.assertEqual(self.search("%"), (200, {}))
        self.assertEqual(self.search("a_b@example.com")[1]["id"], UNDER.id)
        self.assertEqual(self.search("a_c@example.com"), (200, {}))
        self.assertEqual(self.search("___@example.com"), (200, {}))
        self.assertEqual(self.search("%@%"), (200, {}))

    def test_profile_made_elsewhere_is_found_at_once(self) -> None:
        late = Profile(id="LateLateLateLateLate00", name="Late",
                       emails=(Email("late@example.com", True, True),))
        self.ok(self.store.create_profile(late))
        self.assertEqual(self.search("late@example.com")[1]["id"], late.id)

    def test_changed_profile_is_served_fresh(self) -> None:
        self.assertEqual(self.search(BOB.id)[1]["name"], "Bob Builder")
        self.ok(self.store.update_profile(BOB.id, "Robert Builder", None))
        self.ok(Deferred.fromCoroutine(self.directory.refresh()))
        self.assertEqual(self.search(BOB.id)[1]["name"], "Robert Builder")

    def test_missing_user_is_a_validation_error(self) -> None:
        status, body = self.call("/gs-search-people.json", {"token": TOKEN, "search": ""})
        self.assertEqual(status, 400)
        self.assertEqual(body, {"status": 100, "message": ["user: Required input is missing."]})

    def test_overlong_user_is_a_validation_error(self) -> None:
        status, body = self.search("x" * 400 + "@example.com")
        self.assertEqual(status, 400)
        self.assertEqual(body["status"], 100)


class AddHookTests(HooksCase):
    def add(self, **fields: str) -> tuple[int, Any]:
        form = {"token": TOKEN, "groupId": "test", "email": "new@example.com",
                "fn": "New Person", "add": ""}
        form.update(fields)
        return self.call("/gs-group-member-add.json", {k: v for k, v in form.items()
                                                      if v is not None})

    def test_new_address_makes_a_profile_and_adds_it(self) -> None:
        status, body = self.add()
        self.assertEqual(status, 200)
        self.assertEqual(body["status"], 0)
        self.assertEqual(body["message"],
                         "Created a new profile for New Person and added New Person to Test")
        user = body["user"]
        self.assertIsInstance(user["id"], str)
        self.assertEqual(len(user["id"]), 22)
        self.assertEqual(user["name"], "New Person")
        self.assertEqual(user["groups"], ["test"])
        self.assertEqual(user["email"], {"all": ["new@example.com"],
                                         "preferred": ["new@example.com"],
                                         "other": [], "unverified": []})
        self.assertEqual(self.search("new@example.com")[1], user)
        self.assertEqual(self.events, [
            ("profile:created", {"userId": user["id"], "name": "New Person",
                                 "email": "new@example.com"}),
            ("member:added", {"groupId": "test", "userId": user["id"],
                              "email": "new@example.com", "status": 0}),
        ])

    def test_existing_profile_is_added(self) -> None:
        status, body = self.add(email="BOB@example.com", fn="Whoever")
        self.assertEqual((status, body["status"]), (200, 1))
        self.assertEqual(body["message"], "Added Bob Builder to Test")
        self.assertEqual(body["user"]["id"], BOB.id)
        self.assertEqual(body["user"]["groups"], ["test"])
        self.assertEqual(self.events, [("member:added", {
            "groupId": "test", "userId": BOB.id, "email": "BOB@example.com", "status": 1})])

    def test_member_already_is_256(self) -> None:
        status, body = self.add(email="a.person@home.example.com")
        self.assertEqual((status, body["status"]), (200, 256))
        self.assertEqual(body["message"], "A Person is already a member of Test")
        self.assertEqual(body["user"], alice_data())
        self.assertEqual(self.events, [])

    def test_unverified_address_becomes_verified(self) -> None:
        status, body = self.add(email="old@example.org")
        self.assertEqual(body["status"], 256)
        self.assertEqual(body["user"]["email"]["unverified"], [])
        self.assertIn("old@example.org", body["user"]["email"]["other"])

    def test_missing_fields_are_all_reported(self) -> None:
        status, body = self.call("/gs-group-member-add.json", {"token": TOKEN, "add": ""})
        self.assertEqual(status, 400)
        self.assertEqual(body, {"status": 100, "message": [
            "groupId: Required input is missing.",
            "email: Required input is missing.",
            "fn: Required input is missing.",
        ]})

    def test_invalid_addresses_are_validation_errors(self) -> None:
        for bad in ("not-an-address", "a@b", "two@@example.com", "A <a@b>", "<>", "<bad>",
                    "a@example.com b@example.com", "a@-example.com", "a..b@example.com",
                    "a@example.com\nBcc: b@example.com", "x" * 65 + "@example.com", "a@" + "b" * 64 + ".com"):
            status, body = self.add(email=bad)
            self.assertEqual(status, 400, bad)
            self.assertEqual(body["status"], 100)
            self.assertTrue(body["message"][0].startswith("email: "), body)
        self.assertEqual(self.events, [])

    def test_groupserver_address_forms_are_accepted_as_sanitise_address_reads_them(
            self) -> None:
        # gs.profile.email.base's sanitise_address: parseaddr, then strip
        # ",.!?; <>(){}[]" and blanks from both ends.
        forms = [("A Person <new1@example.com>", "new1@example.com"),
                 ("<new2@example.com>", "new2@example.com"),
                 ("new3@example.com,", "new3@example.com"),
                 ('"Person, A" <new4@example.com>,', "new4@example.com"),
                 ("new5@example.com (A Person)", "new5@example.com"),
                 ("new6@example.com.", "new6@example.com"),
                 ("new7@example.com, other@example.com", "new7@example.com"),
                 ("  new8@example.com;  ", "new8@example.com"),
                 # parseaddr joins the atoms of a domain, on Python 2 as on 3
                 ("new9@exa mple.com", "new9@example.com"),
                 (".new10@example.com!", "new10@example.com"),
                 ("new 11@example.com", "new11@example.com")]
        for given, address in forms:
            status, body = self.add(email=given)
            self.assertEqual((status, body["status"]), (200, 0), given)
            self.assertEqual(body["user"]["email"]["all"], [address], given)
        # The address is stored and published as it was read, not as it was sent.
        added = [data["email"] for topic, data in self.events if topic == "member:added"]
        self.assertEqual(added, [address for _, address in forms])
        status, body = self.add(email="Someone Else <NEW1@example.com>")
        self.assertEqual((status, body["status"]), (200, 256))

    def test_sanitised_address_that_is_no_address_names_what_was_sent(self) -> None:
        status, body = self.add(email="A Person <a@b>")
        self.assertEqual((status, body), (400, {"status": 100, "message": [
            "email: 'A Person <a@b>' has an invalid domain."]}))
        status, body = self.add(email="<>")
        self.assertEqual((status, body), (400, {"status": 100, "message": [
            "email: '<>' is not an email address (local@domain)."]}))

    def test_address_texts_that_break_parsers_are_validation_errors(self) -> None:
        status, body = self.add(email="(" * 5000 + "a@example.com")
        self.assertEqual((status, body["status"]), (400, 100))
        self.assertEqual(body["message"], [
            "email: '((((((((((((((((((((((((((((((((((((((((...' is longer than 1024 "
            "characters."])
        status, body = self.add(email="(" * 900 + "a@example.com")
        self.assertEqual((status, body["status"]), (400, 100))
        self.assertEqual(self.events, [])

    def test_unknown_group_is_a_validation_error(self) -> None:
        status, body = self.add(groupId="nosuchgroup")
        self.assertEqual(status, 400)
        self.assertEqual(body, {"status": 100, "message": [
            "groupId: there is no group 'nosuchgroup' on this site."]})
        self.assertEqual(self.search("new@example.com"), (200, {}))

    def test_unknown_group_is_reported_with_other_errors(self) -> None:
        status, body = self.add(groupId="nosuchgroup", email="bad", fn="")
        self.assertEqual(status, 400)
        self.assertEqual(len(body["message"]), 3)
        self.assertIn("groupId: there is no group 'nosuchgroup' on this site.", body["message"])

    def test_group_made_elsewhere_is_known_at_once(self) -> None:
        self.ok(self.store.create_group(Group("fresh", "Fresh")))
        status, body = self.add(groupId="fresh")
        self.assertEqual((status, body["status"]), (200, 0))

    def test_bad_time_zone_and_name(self) -> None:
        status, body = self.add(tz="Mars/Olympus", fn="x" * 300)
        self.assertEqual(status, 400)
        self.assertEqual([m.split(":")[0] for m in body["message"]], ["fn", "tz"])
        status, body = self.add(tz="Europe/Paris", biography="<p>Hello</p>")
        self.assertEqual((status, body["status"]), (200, 0))


class SiteMembersHookTests(HooksCase):
    def test_users_lists_the_ids_of_group_members(self) -> None:
        status, body = self.call("/gs-site-member-list.json", {"token": TOKEN, "users": ""})
        self.assertEqual(status, 200)
        self.assertEqual(body, sorted([ALICE.id, UNDER.id]))

    def test_user_groups_lists_profiles_with_their_groups(self) -> None:
        status, body = self.call("/gs-site-member-list.json",
                                 {"token": TOKEN, "user_groups": ""})
        self.assertEqual(status, 200)
        by_id = {entry["id"]: entry for entry in body}
        self.assertEqual(set(by_id), {ALICE.id, UNDER.id})
        self.assertEqual(by_id[ALICE.id], alice_data())
        for entry in body:
            self.assertEqual(set(entry), {"id", "name", "url", "email", "groups"})

    def test_membership_made_elsewhere_is_listed_at_once(self) -> None:
        self.ok(self.store.add_member("test", BOB.id))
        status, body = self.call("/gs-site-member-list.json", {"token": TOKEN, "users": ""})
        self.assertEqual(body, sorted([ALICE.id, BOB.id, UNDER.id]))

    def test_alias_path_answers_the_same(self) -> None:
        status, body = self.call("/gs-site-member.json", {"token": TOKEN, "users": ""})
        self.assertEqual((status, body), (200, sorted([ALICE.id, UNDER.id])))


class LeaveHookTests(HooksCase):
    def leave(self, group_id: str, user_id: str) -> tuple[int, Any]:
        return self.call("/gs-group-member-leave.json", {
            "token": TOKEN, "groupId": group_id, "userId": user_id, "leave": ""})

    def test_member_leaves(self) -> None:
        status, body = self.leave("test", ALICE.id)
        self.assertEqual(status, 200)
        self.assertEqual(body, {"status": 0, "message": "A Person has left Test",
                                "groupId": "test", "userId": ALICE.id})
        self.assertEqual(self.search(ALICE.id)[1]["groups"], ["example"])
        self.assertEqual(self.events, [("member:left", {"groupId": "test", "userId": ALICE.id})])

    def test_statuses_of_groupserver(self) -> None:
        self.assertEqual(self.leave("nosuch", ALICE.id)[1]["status"], 1)
        self.assertEqual(self.leave("nosuch", ALICE.id)[1]["message"], 'No such group "nosuch"')
        self.assertEqual(self.leave("test", "NoSuchUser")[1]["status"], 2)
        status, body = self.leave("test", BOB.id)
        self.assertEqual((status, body["status"]), (200, 4))
        self.assertEqual(body["message"], "Bob Builder is not a member of Test")
        self.assertEqual(self.events, [])

    def test_missing_fields_are_all_reported(self) -> None:
        status, body = self.call("/gs-group-member-leave.json", {"token": TOKEN, "leave": ""})
        self.assertEqual(status, 400)
        self.assertEqual(body["message"], ["userId: Required input is missing.",
                                           "groupId: Required input is missing."])


class TokenTests(HooksCase):
    def test_missing_empty_and_wrong_tokens_are_refused_and_audited(self) -> None:
        forms: list[dict[str, str]] = [
            {"get": ""}, {"get": "", "token": ""}, {"get": "", "token": "nope" * 8}]
        for form in forms:
            self.clock.advance(3600)  # long enough apart not to be slowed down
            status, body = self.call("/gs-group-groups.json", form)
            self.assertEqual(status, 403, form)
            self.assertEqual(body["status"], 100)
            self.assertEqual(len(body["message"]), 1)
            self.assertNotIn("nope", json.dumps(body))
        rows = self.audit()
        self.assertEqual([r["event"] for r in rows], ["token-mismatch"] * 3)
        self.assertEqual({r["client"] for r in rows}, {"127.0.0.1"})
        self.assertEqual([r["detail"] for r in rows], [
            "hook=/gs-group-groups.json token=wrong",
            "hook=/gs-group-groups.json token=empty",
            "hook=/gs-group-groups.json token=missing"])
        for row in rows:
            self.assertNotIn("nope", json.dumps(row))
            self.assertTrue(row["at"])
        self.assertEqual(auth_failures(self.metrics, "hooks"), 3)

    def test_every_hook_refuses_a_wrong_token(self) -> None:
        for path, spec in HOOKS.items():
            form = {spec.actions[0][0]: "", "token": "wrong", "user": ALICE.id,
                    "groupId": "test", "userId": ALICE.id, "email": "x@example.com", "fn": "X"}
            self.clock.advance(3600)  # no throttling between these
            status, body = self.call(path, form)
            self.assertEqual(status, 403, path)
        self.assertEqual(self.ok(self.store.load_groups())[1].id, "test")
        self.assertEqual(self.search(ALICE.id)[1]["groups"], ["example", "test"])

    def test_repeated_failures_are_slowed_down_without_blocking(self) -> None:
        self.assertEqual(self.call("/gs-group-groups.json", {"get": "", "token": "x"})[0], 403)
        d = self.http.post(BASE + "/gs-group-groups.json", data={"get": "", "token": "x"})
        self.http.flush()
        self.assertNoResult(d)
        # Meanwhile the right token is answered at once.
        self.assertEqual(self.call("/gs-group-groups.json", {"get": "", "token": TOKEN})[0], 200)
        self.clock.advance(0.25)
        self.http.flush()
        self.assertEqual(self.successResultOf(d).code, 403)

    def test_rotated_token_is_accepted_at_once_and_the_old_one_refused(self) -> None:
        new = "NewTokenNewTokenNewTokenNewToken"
        self.ok(self.store.set_token(new))
        self.assertEqual(self.search(ALICE.id, token=new), (200, alice_data()))
        self.ok(Deferred.fromCoroutine(self.directory.refresh()))
        self.assertEqual(self.search(ALICE.id, token=TOKEN)[0], 403)

    def test_no_token_on_the_site_refuses_everything(self) -> None:
        self.ok(self.store.set_token(None))
        self.ok(Deferred.fromCoroutine(self.directory.refresh()))
        self.assertEqual(self.search(ALICE.id, token=TOKEN)[0], 403)


class BadInputTests(HooksCase):
    def test_non_utf8_body(self) -> None:
        status, body = self.call("/gs-search-people.json",
                                 body=b"token=" + TOKEN.encode() + b"&search&user=\xff\xfe")
        self.assertEqual(status, 400)
        self.assertEqual(body["status"], 100)
        self.assertIn("UTF-8", body["message"][0])

    def test_non_utf8_percent_encoded(self) -> None:
        status, body = self.call("/gs-search-people.json", query="search&user=%ff",
                                 body=("token=" + TOKEN).encode())
        self.assertEqual(status, 400)
        self.assertIn("utf-8", body["message"][0].lower())

    def test_latin1_query_of_a_get(self) -> None:
        status, body = self.call("/gs-search-people.json", method="GET",
                                 query="search&token=%s&user=Andr%%E9" % TOKEN)
        self.assertEqual(status, 400)
        self.assertEqual(body["status"], 100)

    def test_ten_megabyte_body_is_413(self) -> None:
        big = b"token=" + TOKEN.encode() + b"&search&user=" + b"a" * (10 * 1024 * 1024)
        status, body = self.call("/gs-search-people.json", body=big)
        self.assertEqual(status, 413)
        self.assertEqual(body["status"], 100)
        self.assertIn("larger than", body["message"][0])

    def test_bad_json_body(self) -> None:
        for raw in (b"{", b"[1]", b'{"token": {"a": 1}}', b"[" * 100_000,
                    b'{"a":' * 100_000):
            status, body = self.call("/gs-search-people.json", body=raw,
                                     headers={b"content-type": [b"application/json"]})
            self.assertEqual(status, 400, raw)
            self.assertEqual(body["status"], 100)

    def test_json_body_with_nan_infinity_or_too_deep_is_400_and_too_large_413(self) -> None:
        search = b'"token": "%s", "search": "", "user": "%s"' % (TOKEN.encode(), ALICE.id.encode())
        for extra, why in ((b"NaN", "NaN is not JSON"), (b"Infinity", "Infinity is not JSON"),
                           (b"-Infinity", "Infinity is not JSON"),
                           (b"[" * 65 + b"]" * 65, "nested too deeply")):
            status, body = self.call("/gs-search-people.json",
                                     body=b"{" + search + b', "x": ' + extra + b"}",
                                     headers={b"content-type": [b"application/json"]})
            self.assertEqual(status, 400, extra)
            self.assertEqual(body["status"], 100)
            self.assertIn(why, body["message"][0])
        status, body = self.call(
            "/gs-search-people.json", headers={b"content-type": [b"application/json"]},
            body=b"{" + search + b', "x": "' + b"x" * (10 * 1024 * 1024) + b'"}')
        self.assertEqual(status, 413)
        self.assertIn("larger than", body["message"][0])

    def test_unknown_sub_paths_are_json_404(self) -> None:
        for path in ("/gs-search-people.json/extra", "/gs-nothing.json", "/",
                     "/gs-search-people.jsonx"):
            status, body = self.call(path, {"token": TOKEN, "search": ""})
            self.assertEqual(status, 404, path)
            self.assertEqual(body["status"], 404)

    def test_other_methods_are_json_405(self) -> None:
        status, body = self.call("/gs-search-people.json", {"token": TOKEN}, method="PUT")
        self.assertEqual(status, 405)
        self.assertEqual(body["status"], 405)

    def test_get_with_everything_in_the_query_works(self) -> None:
        status, body = self.call("/gs-search-people.json", method="GET",
                                 query=urlencode({"token": TOKEN, "user": ALICE.id,
                                                  "search": ""}))
        self.assertEqual((status, body), (200, alice_data()))

    def test_repeated_fields_use_the_last(self) -> None:
        status, body = self.call(
            "/gs-search-people.json",
            body=("token=%s&search&user=nobody&user=%s" % (TOKEN, ALICE.id)).encode())
        self.assertEqual((status, body["id"]), (200, ALICE.id))

    def test_answers_are_counted(self) -> None:
        self.search(ALICE.id)
        self.search("")
        self.assertEqual(self.metrics.value("mailhub_hook_requests_total", {
            "hook": "/gs-search-people.json", "status": "200"}), 1)
        self.assertEqual(self.metrics.value("mailhub_hook_requests_total", {
            "hook": "/gs-search-people.json", "status": "400"}), 1)


class GroupServerStatusCodesTests(HooksCase):
    """``[hooks] status_codes = groupserver``: every refusal is HTTP 200, as GroupServer's."""

    status_codes = "groupserver"

    def count(self, hook: str, status: str) -> float:
        return self.metrics.value("mailhub_hook_requests_total",  # type: ignore[no-any-return]
                                  {"hook": hook, "status": status})

    def test_validation_errors_are_200_with_status_100(self) -> None:
        status, body = self.call("/gs-group-member-add.json", {"token": TOKEN, "add": ""})
        self.assertEqual((status, body), (200, {"status": 100, "message": [
            "groupId: Required input is missing.",
            "email: Required input is missing.",
            "fn: Required input is missing.",
        ]}))
        status, body = self.call("/gs-search-people.json", {"token": TOKEN, "search": ""})
        self.assertEqual((status, body), (200, {"status": 100, "message": [
            "user: Required input is missing."]}))
        # Malformed bodies are validation errors too.
        status, body = self.call("/gs-search-people.json", body=b"{",
                                 headers={b"content-type": [b"application/json"]})
        self.assertEqual((status, body["status"]), (200, 100))
        status, body = self.call("/gs-search-people.json", method="GET",
                                 query="search&token=%s&user=Andr%%E9" % TOKEN)
        self.assertEqual((status, body["status"]), (200, 100))
        self.assertEqual(self.events, [])

    def test_refused_tokens_are_200_with_status_100_and_still_audited(self) -> None:
        for form in ({"get": ""}, {"get": "", "token": ""}, {"get": "", "token": "nope" * 8}):
            self.clock.advance(3600)
            status, body = self.call("/gs-group-groups.json", form)
            self.assertEqual(status, 200, form)
            self.assertEqual(body["status"], 100)
            self.assertEqual(len(body["message"]), 1)
            self.assertNotIn("nope", json.dumps(body))
        self.assertEqual(len(self.audit()), 3)
        self.assertEqual(auth_failures(self.metrics, "hooks"), 3)
        # Counted by what they mean, as in the http mode.
        self.assertEqual(self.count("/gs-group-groups.json", "403"), 3)
        self.assertEqual(self.count("/gs-group-groups.json", "200"), 0)

    def test_every_hook_refuses_a_wrong_token_with_200(self) -> None:
        for path, spec in HOOKS.items():
            form = {spec.actions[0][0]: "", "token": "wrong", "user": ALICE.id,
                    "groupId": "test", "userId": ALICE.id, "email": "x@example.com", "fn": "X"}
            self.clock.advance(3600)
            status, body = self.call(path, form)
            self.assertEqual((status, body["status"]), (200, 100), path)
        self.assertEqual(self.search(ALICE.id)[1]["groups"], ["example", "test"])

    def test_the_openapi_document_of_this_mode_promises_what_refusals_answer(self) -> None:
        import jsonschema

        document = site_document(status_codes="groupserver")
        for path, spec in HOOKS.items():
            for method in ("post", "get"):
                responses = document["paths"][path][method]["responses"]
                self.assertNotIn("400", responses, path)
                self.assertNotIn("403", responses, path)
            schema = responses["200"]["content"]["application/json"]["schema"]
            validator = jsonschema.Draft202012Validator(
                dict(schema, components=document["components"]))
            self.clock.advance(3600)
            for form in ({spec.actions[0][0]: "", "token": "wrong"},
                         {spec.actions[0][0]: "", "token": TOKEN, "user": "", "groupId": "",
                          "userId": "", "email": "", "fn": ""}):
                status, body = self.call(path, form)
                self.assertEqual(status, 200, (path, form))
                validator.validate(body)  # raises if the document does not promise it
        # The default mode still documents its real codes.
        responses = site_document()["paths"]["/gs-search-people.json"]["post"]["responses"]
        self.assertIn("400", responses)
        self.assertIn("403", responses)

    def test_answers_that_are_not_refusals_do_not_change(self) -> None:
        self.assertEqual(self.search(ALICE.id), (200, alice_data()))
        status, body = self.call("/gs-group-member-leave.json",
                                 {"token": TOKEN, "groupId": "nosuch", "userId": ALICE.id,
                                  "leave": ""})
        self.assertEqual((status, body["status"]), (200, 1))
        status, body = self.call("/gs-group-groups.json", {})
        self.assertEqual((status, body["message"]), (200, ["", GROUPS_LABEL]))

    def test_no_hook_wrong_method_and_too_large_keep_their_codes(self) -> None:
        # Answers of the server, not of a hook: GroupServer's Zope answers a
        # missing page 404 too, and the body bound is mailhub's own.
        status, body = self.call("/gs-nothing.json", {"token": TOKEN, "search": ""})
        self.assertEqual((status, body["status"]), (404, 404))
        status, body = self.call("/gs-search-people.json", {"token": TOKEN}, method="PUT")
        self.assertEqual((status, body["status"]), (405, 405))
        big = b"token=" + TOKEN.encode() + b"&search&user=" + b"a" * (2 * 1024 * 1024)
        status, body = self.call("/gs-search-people.json", body=big)
        self.assertEqual((status, body["status"]), (413, 100))

    def test_validation_errors_are_counted_as_400(self) -> None:
        self.search("")
        self.assertEqual(self.count("/gs-search-people.json", "400"), 1)
        self.assertEqual(self.count("/gs-search-people.json", "200"), 0)


GROUPS_LABEL = "Get the groups on the site"


class UnitTests(SynchronousTestCase):
    # test_addresses moved to tests/test_decoding.py (AddressRules): the one validator.

    def test_throttle_grows_to_a_cap_and_forgets(self) -> None:
        # The hooks' token failures are slowed by the shared mailhub.auth.Throttle.
        clock = Clock()
        throttle = Throttle(clock, base=0.25, max_delay=2.0, forget_after=60, max_keys=2)

        def failed(client: str) -> float:
            throttle.after(SITE_TOKEN, client, False)
            return throttle.delay_of(SITE_TOKEN, client)

        self.assertEqual([failed("a") for _ in range(6)],
                         [0.0, 0.25, 0.5, 1.0, 2.0, 2.0])
        clock.advance(61)
        self.assertEqual(failed("a"), 0.0)
        failed("b")
        failed("c")
        self.assertEqual({client for _, client in throttle._pairs._records}, {"b", "c"})
        throttle.after(SITE_TOKEN, "b", True)
        self.assertEqual({client for _, client in throttle._pairs._records}, {"c"})

    def test_paths_cover_every_hook(self) -> None:
        self.assertEqual(set(GroupHooks.paths), {p.lstrip("/").encode() for p in HOOKS})
        self.assertTrue(attrs.has(type(HOOKS["/gs-search-people.json"])))


class OpenAPITests(SynchronousTestCase):
    def test_document_lists_every_hook_and_the_extra_paths(self) -> None:
        from mailhub.web.openapi import openapi_document

        extra = {"/push/v1/notify": {"post": {"responses": {"204": {"description": "ok"}}}}}
        doc = openapi_document(extra, {"Extra": {"type": "object"}})
        self.assertEqual(doc["openapi"], "3.1.0")
        self.assertEqual(set(doc["paths"]), set(HOOKS) | set(extra))
        for path, spec in HOOKS.items():
            # The lists answer 503 while the directory loads (issue 15: documented).
            loading = {"503"} if spec.path in ("/gs-group-groups.json",
                                               "/gs-site-member-list.json") else set()
            for method in ("get", "post"):
                responses = doc["paths"][path][method]["responses"]
                self.assertEqual(set(responses), {"200", "400", "403", "413"} | loading)
        form = doc["paths"]["/gs-search-people.json"]["post"]["requestBody"]["content"]
        self.assertEqual(set(form["application/x-www-form-urlencoded"]["schema"]["properties"]),
                         {"token", "user", "search"})
        self.assertIn("Extra", doc["components"]["schemas"])
        self.assertIn("ProfileData", doc["components"]["schemas"])
        json.dumps(doc)  # serialisable as /openapi.json serves it
