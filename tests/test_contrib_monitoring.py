"""The shipped Prometheus rules and Grafana dashboard are valid and name real metrics.

issue 15: contrib/prometheus/mailhub-rules.yml passes ``promtool check rules``
(Debian's prometheus package, installed by tests/run) and its own unit tests
(``promtool test rules``); every query of contrib/grafana/mailhub.json is valid
PromQL; and every ``mailhub_*`` metric either of them names is one that a
running mailhub serves on ``/metrics`` (read there, not from a list kept here),
with and without a broker.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.amqp_peer import VirtualHost
from tests.support.process import Mailhub
from tests.support.require import require_program

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
RULES = CONTRIB / "prometheus" / "mailhub-rules.yml"
DASHBOARD = CONTRIB / "grafana" / "mailhub.json"
METRIC = re.compile(r"\b(mailhub_[a-z0-9_]+)")

#: What the issue asks the rules to watch, and the alert that does.
WATCHED = {
    "broker down": "MailhubBrokerDown",
    "dead letters growing": "MailhubDeadLettersGrowing",
    "dead letters growing, no broker": "MailhubSpoolDeadLettersGrowing",
    "CardDAV failing": "MailhubCardDAVFailing",
    "auth failures spiking": "MailhubAuthFailuresSpiking",
    "push 503s": "MailhubPush503",
    "outbox filling": "MailhubOutboxFilling",
}


def rules() -> list[dict[str, str]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    document = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in document["panels"] for target in panel["targets"]]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_program("promtool"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_the_rules_pass_promtool_check() -> None:
    done = promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: %d rules found" % len(rules()) in done.stdout


def test_the_rules_fire_as_their_unit_tests_expect() -> None:
    done = promtool("test", "rules", "mailhub-rules.test.yml", cwd=RULES.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_concern_of_the_issue_has_an_alert() -> None:
    names = {rule["alert"] for rule in rules()}
    assert set(WATCHED.values()) <= names
    assert all(rule["labels"]["severity"] in ("warning", "critical") for rule in rules())


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each query, with the $instance variable filled in, checked as a recording rule."""
    queries = dashboard_queries()
    assert queries
    recorded = {"groups": [{"name": "dashboard", "rules": [
        {"record": "dashboard:query%d" % n, "expr": query.replace("$instance", ".*")}
        for n, query in enumerate(queries)]}]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(recorded))
    done = promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def served_names(text: str) -> set[str]:
    """Every sample name a /metrics page can hold, families with no sample yet included."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created"), "gauge": ("",), "untyped": ("",)}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def vhost() -> Iterator[VirtualHost]:
    vhost = VirtualHost().create()
    yield vhost
    vhost.delete()


#: Labels Prometheus adds (or histograms have) rather than mailhub's code.
OWN_LABELS = {"instance", "job", "le", "__name__"}


def _closing(text: str, opening: int) -> int:
    """The index of the parenthesis that closes the one at ``opening``."""
    depth = 0
    for index in range(opening, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return index
    raise ValueError("unbalanced parentheses in %r" % text)


def used_labels(query: str) -> set[tuple[str, str]]:
    """(metric, label) for every label a query matches on or groups by."""
    used: set[tuple[str, str]] = set()
    for selector in re.finditer(r"(mailhub_[a-z0-9_]+)\{([^}]*)\}", query):
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!=|!~|=)", selector.group(2)):
            used.add((selector.group(1), label))
    for grouping in re.finditer(r"\bby\s*\(([^)]*)\)\s*\(", query):
        inner = query[grouping.end() - 1:_closing(query, grouping.end() - 1) + 1]
        for metric in METRIC.findall(inner):
            for label in grouping.group(1).split(","):
                used.add((metric, label.strip()))
    return {(metric, label) for metric, label in used if label and label not in OWN_LABELS}


def sample_labels(text: str) -> dict[str, set[str]]:
    """Label names seen on each sample name of a /metrics page."""
    seen: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            seen.setdefault(sample.name, set()).update(sample.labels)
    return seen


def served_by(folder: Path, config: str, timeout: float = 30.0) -> set[str]:
    """The names a mailhub serves once started: parts register their metrics as
    they start (some only once the database is ready), so scrape until the set
    stays the same three times in a row."""
    folder.mkdir()
    with Mailhub(folder, config="[mailhub]\ndata = %s\n%s" % (folder / "data", config)) as mailhub:
        deadline = time.monotonic() + timeout
        seen: list[set[str]] = []
        while time.monotonic() < deadline and (len(seen) < 3 or seen[-1] != seen[-2]
                                               or seen[-2] != seen[-3]):
            seen.append(served_names(scrape(mailhub)))
            time.sleep(0.5)
        # Requests that give the labelled families their first samples.
        mailhub.post_form("/gs-group-groups.json", "token=wrong&get")
        mailhub.request("POST", "/push/v1/notify", b"{}", {"Content-Type": "application/json"})
        LABELS.update({name: LABELS.get(name, set()) | labels
                       for name, labels in sample_labels(scrape(mailhub)).items()})
    return seen[-1]


#: Label names seen per sample name, filled by served_by().
LABELS: dict[str, set[str]] = {}


def scrape(mailhub: Mailhub) -> str:
    status, body = mailhub.get("/metrics")
    assert status == 200
    return body.decode("utf-8") if isinstance(body, bytes) else str(body)


def test_every_metric_the_rules_and_dashboard_name_is_served(tmp_path: Path,
                                                            vhost: VirtualHost) -> None:
    served = served_by(tmp_path / "embedded", "")
    served |= served_by(tmp_path / "broker", "[amqp]\nurl = %s\n" % vhost.url)
    used = {name for rule in rules() for name in METRIC.findall(rule["expr"])}
    used |= {name for query in dashboard_queries() for name in METRIC.findall(query)}
    assert len(used) >= 10
    unknown = sorted(used - served)
    assert unknown == [], "metrics named in contrib/ that mailhub does not serve: %s" % unknown

    # Labels: checked on every metric that has samples by now (the others have
    # no labelled child yet, so their label names cannot be read).
    queries = [rule["expr"] for rule in rules()] + dashboard_queries()
    labels = {pair for query in queries for pair in used_labels(query)}
    assert ("mailhub_http_requests_total", "status") in labels
    checked = {(metric, label) for metric, label in labels if LABELS.get(metric)}
    assert ("mailhub_http_requests_total", "route") in checked
    missing = {(metric, label) for metric, label in checked if label not in LABELS[metric]}
    assert sorted(missing) == [], \
        "labels used in contrib/ that mailhub's metrics do not have: %s" % sorted(missing)
    assert ("mailhub_auth_failures_total", "reason") in checked
