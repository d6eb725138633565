"""No secret reaches the log: every surface used with secrets in its query string.

A real ``twistd mailhub``; its whole log (access log included) is searched
for each secret afterwards. The site token in the query string is documented
usage, and MailStore may send its fields (``pass``) in the query.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

from tests.support.process import Mailhub

MAILHUB = str(Path(sys.executable).with_name("mailhub"))

CONFIG = """\
[mailstore]
username = mailstore
password = ms-basic-secret
[push]
username = dovecot
password = push-basic-secret
"""


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(
        ("%s:%s" % (user, password)).encode()).decode()}


def test_secrets_in_query_strings_are_redacted_from_the_log(tmp_path: Path) -> None:
    (tmp_path / "mailhub.ini").write_text(CONFIG)
    created = subprocess.run([MAILHUB, "token", "create", "--config",
                              str(tmp_path / "mailhub.ini")],
                             cwd=tmp_path, capture_output=True, text=True, timeout=60,
                             check=True)
    token = created.stdout.splitlines()[1].strip()
    secrets = [token, "wrong-token-secret", "mailstore-pass-secret", "password-param-secret",
               "pass-param-secret", "events-token-secret", "dav-password-secret"]
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    with Mailhub(tmp_path, config=CONFIG) as mailhub:
        status, groups = mailhub.request("POST", "/gs-group-groups.json?token=%s&get" % token,
                                         b"", form)
        assert status == 200 and groups == []
        status, _ = mailhub.request("GET", "/gs-search-people.json?search&user=a%40b.c"
                                    "&token=wrong-token-secret")
        assert status == 403
        status, answer = mailhub.request(
            "POST", "/mailstore?cmd=auth&user=ann&pass=mailstore-pass-secret", b"",
            dict(form, **_basic("mailstore", "ms-basic-secret")))
        assert status == 200 and answer == {"succeeded": False}
        mailhub.request("POST", "/push/v1/notify?password=password-param-secret",
                        b"{}", {"Content-Type": "application/json",
                                **_basic("dovecot", "push-basic-secret")})
        mailhub.request("PUT", "/preliminary/http-notify/v1/notify?pass=pass-param-secret",
                        b"{}", {"Content-Type": "application/json"})
        mailhub.request("GET", "/api/v1/events?token=events-token-secret")
        mailhub.request("POST", "/collector/v1/calendar?Token=wrong-token-secret", b"",
                        {"Content-Type": "text/calendar"})
        mailhub.request("PROPFIND", "/dav/?password=dav-password-secret")
        mailhub.request("GET", "/healthz?token=wrong-token-secret")
        status, _ = mailhub.request("GET", "/metrics?pass%77ord=password-param-secret")
        assert status == 200
    log = mailhub.log.read_text()
    for path in ("/gs-group-groups.json?token=***&get", "/mailstore?cmd=auth&user=ann&pass=***",
                 "/push/v1/notify?password=***", "/preliminary/http-notify/v1/notify?pass=***",
                 "/api/v1/events?token=***", "/collector/v1/calendar?Token=***",
                 "/dav/?password=***", "/healthz?token=***", "/metrics?pass%77ord=***"):
        assert path in log, log
    for secret in secrets + ["ms-basic-secret", "push-basic-secret"]:
        assert secret not in log, "%s is in the log:\n%s" % (secret, log)
