"""GroupServer's documented wget commands against a real ``twistd mailhub``, in both status modes.

Each command is the one in the hook's own documentation (gs.group.groups.json,
gs.group.member.add.json, gs.search.people, gs.site.member.json,
gs.group.member.leave.json), run verbatim but for the host, with ``wget``
itself: no ``--content-on-error``, so, as with GroupServer, a script sees a
refusal's body only when it comes with HTTP 200. ``token=Fake`` in the
documented commands is a refused token; the same commands with the site's
token must succeed in both modes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.process import Mailhub

HOST = "http://groups.example.com"

#: (documented command, the file wget saves the answer to).
DOCUMENTED = {
    "groups": ('wget --post-data="token=Fake&get" \\\n'
               '  http://groups.example.com/gs-group-groups.json', "gs-group-groups.json"),
    "add": ("wget http://groups.example.com/gs-group-member-add.json \\\n"
            "  --post-data='token=Fake&groupId=test&email=a.person@home.example.com"
            "@fn=A%20Person&add'", "gs-group-member-add.json"),
    "search": ("wget --post-data='token=fake&user=a.person@home.example.com&search' \\\n"
               "  http://groups.example.com/gs-search-people.json", "gs-search-people.json"),
    "users": ("wget --post-data='token=Fake&users' \\\n"
              "  http://groups.example.com/gs-site-member-list.json",
              "gs-site-member-list.json"),
    "user_groups": ("wget --post-data='token=Falke&user_groups' \\\n"
                    "  http://groups.example.com/gs-site-member-list.json",
                    "gs-site-member-list.json"),
    "leave": ("wget --post-data='token=Fake&groupId=test&userId=qK7SgjsTHcLNrJ2ClevcJ0&leave' \\\n"
              "  http://groups.example.com/gs-group-member-leave.json",
              "gs-group-member-leave.json"),
}

pytestmark = pytest.mark.skipif(shutil.which("wget") is None, reason="wget is not installed")


class Site:
    """A running mailhub with a token and a group ``test``; runs wget in fresh folders."""

    def __init__(self, mailhub: Mailhub, folder: Path) -> None:
        self.mailhub = mailhub
        self.folder = folder
        self.runs = 0
        self.token = self.cli("token", "create").splitlines()[1]
        self.cli("group", "add", "test", "--name", "Test")

    def cli(self, *args: str) -> str:
        mailhub = str(Path(sys.executable).with_name("mailhub"))
        return subprocess.run([mailhub, *args, "--config", str(self.folder / "mailhub.ini")],
                              cwd=self.folder, capture_output=True, text=True, timeout=60,
                              check=True).stdout

    def wget(self, name: str, token: str | None = None) -> tuple[int, Any]:
        """(wget's exit code, the JSON it saved or None) for a documented command."""
        command, saved = DOCUMENTED[name]
        command = command.replace(HOST, self.mailhub.url)
        if token is not None:
            for fake in ("token=Fake", "token=fake", "token=Falke"):
                command = command.replace(fake, "token=" + token)
        self.runs += 1
        where = self.folder / ("wget-%d" % self.runs)
        where.mkdir()
        done = subprocess.run(["bash", "-c", command], cwd=where, capture_output=True,
                              text=True, timeout=60)
        path = where / saved
        return done.returncode, json.loads(path.read_text()) if path.exists() else None


@pytest.fixture(params=["http", "groupserver"])
def site(request: Any, tmp_path: Path) -> Any:
    config = "" if request.param == "http" else "[hooks]\nstatus_codes = groupserver\n"
    with Mailhub(tmp_path, config=config) as mailhub:
        yield request.param, Site(mailhub, tmp_path)


#: wget's exit status when the server answers an error (4xx, 5xx).
WGET_SERVER_ERROR = 8


def test_documented_commands_with_a_fake_token(site: Any) -> None:
    mode, gs = site
    for name in DOCUMENTED:
        code, body = gs.wget(name)
        if mode == "http":
            # A 403: wget fails and keeps no body, as it would against a real 403.
            assert (code, body) == (WGET_SERVER_ERROR, None), name
        else:
            # As GroupServer: 200, and the script reads status 100 and why.
            assert code == 0, name
            assert body == {"status": 100, "message": [
                "The authentication token does not match the one in the database."]}, name


def test_documented_commands_with_the_site_token(site: Any) -> None:
    mode, gs = site
    code, body = gs.wget("groups", gs.token)
    assert code == 0
    assert [(g["id"], g["type"]) for g in body] == [("test", "Discussion group")]

    # The add command as documented runs "@fn=" into the address: no name.
    code, body = gs.wget("add", gs.token)
    if mode == "http":
        assert (code, body) == (WGET_SERVER_ERROR, None)
    else:
        assert code == 0
        assert body["status"] == 100
        assert "fn: Required input is missing." in body["message"]

    code, body = gs.wget("search", gs.token)
    assert (code, body) == (0, {})

    code, body = gs.wget("users", gs.token)
    assert (code, body) == (0, [])
    code, body = gs.wget("user_groups", gs.token)
    assert (code, body) == (0, [])

    code, body = gs.wget("leave", gs.token)
    assert code == 0
    assert (body["status"], body["groupId"]) == (2, "test")  # no such user


def test_groupserver_address_forms_through_wget(site: Any) -> None:
    mode, gs = site
    url = gs.mailhub.url + "/gs-group-member-add.json"
    for given in ("A Person <a.person@home.example.com>", "<b@example.com>", "c@example.com,"):
        gs.runs += 1
        where = gs.folder / ("wget-%d" % gs.runs)
        where.mkdir()
        done = subprocess.run(
            ["wget", "-q", "-O", "answer.json", url, "--post-data",
             "token=%s&groupId=test&fn=A%%20Person&add&email=%s"
             % (gs.token, given.replace(" ", "%20").replace("<", "%3C").replace(">", "%3E"))],
            cwd=where, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (given, done.stderr)
        body = json.loads((where / "answer.json").read_text())
        assert body["status"] == 0, body
    code, body = gs.wget("search", gs.token)
    assert code == 0 and body["email"]["all"] == ["a.person@home.example.com"]


def test_gs_form_callers_read_refusals_as_groupserver_answers_them(site: Any) -> None:
    """``gs.form.post_multipart`` (PyPI, what smtp2gs and GroupServer's scripts use)."""
    post_multipart = pytest.importorskip("gs.form").post_multipart
    mode, gs = site
    netloc = gs.mailhub.url.split("//", 1)[1]
    fields = {"token": gs.token, "groupId": "test", "email": "Zoe <zoe@example.com>,",
              "fn": "Zoe", "add": ""}  # gs.form 2.2 on Python 3 sends Latin-1 only
    status, reason, data = post_multipart(netloc, "/gs-group-member-add.json", fields)
    assert status == 200
    body = json.loads(data)
    assert (body["status"], body["user"]["email"]["all"]) == (0, ["zoe@example.com"])

    status, reason, data = post_multipart(netloc, "/gs-group-member-add.json",
                                          dict(fields, token="wrong"))
    assert status == (403 if mode == "http" else 200)
    assert json.loads(data)["status"] == 100

    status, reason, data = post_multipart(netloc, "/gs-group-member-add.json",
                                          dict(fields, email="nobody"))
    assert status == (400 if mode == "http" else 200)
    assert json.loads(data) == {"status": 100, "message": [
        "email: 'nobody' is not an email address (local@domain)."]}
