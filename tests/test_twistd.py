"""``twistd mailhub`` as a user runs it: defaults, config files, the .tac, the wheel.

These start the real process and talk to it over HTTP.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from mailhub.cli.common import result_of
from mailhub.directory.sql import MIGRATIONS, SQLStore, dialect_for
from tests.support.metrics import matching
from tests.support.postgres import throwaway_database
from tests.support.process import TWISTD, Mailhub
from tests.support.require import free_port

ROOT = Path(__file__).resolve().parent.parent
#: The schema version a fresh database is migrated to, twice (the "N of N" of /healthz).
NEWEST = (len(MIGRATIONS), len(MIGRATIONS))


def test_defaults_serve_on_sqlite_and_stop_cleanly_on_sigterm(tmp_path: Path) -> None:
    mailhub = Mailhub(tmp_path).start()
    status, health = mailhub.get("/healthz")
    assert status == 200
    assert health["dependencies"]["database"] == {"ok": True, "detail": "sqlite: schema version %d of %d" % NEWEST}
    assert (tmp_path / "mailhub-data" / "mailhub.sqlite").exists()
    status, body = mailhub.get("/no/such/thing")
    assert status == 404 and "no such resource" in body["error"]
    # twistd shuts down, then ends itself with the signal it got, as
    # systemd expects of a service stopped by SIGTERM.
    code = mailhub.stop()
    log = mailhub.log.read_text()
    assert code == -signal.SIGTERM, log
    assert "Server Shut Down." in log
    assert "Traceback" not in log


def test_config_file_selects_postgresql(tmp_path: Path) -> None:
    with throwaway_database() as dsn:
        with Mailhub(tmp_path, config="[database]\ndsn = %s\n" % dsn) as mailhub:
            status, health = mailhub.get("/healthz")
            assert health["dependencies"]["database"] == {"ok": True, "detail": "postgresql: schema version %d of %d" % NEWEST}
            status, text = mailhub.get("/metrics")
            assert matching(text, "mailhub_http_requests_total",
                            method="GET", route="/healthz", status="200")


def test_bad_config_stops_start_up_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "mailhub.ini"
    config.write_text("[amqp]\nprefetch = lots\n")
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "mailhub", "--config", str(config)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["mailhub: configuration error: %s: [amqp] prefetch: bad value: "
                     "invalid literal for int() with base 10: 'lots'" % config]


def test_oversized_body_is_refused_with_json_413(tmp_path: Path) -> None:
    with Mailhub(tmp_path, config="[mailhub]\nmax_body = 1024\n") as mailhub:
        status, body = mailhub.request("POST", "/gs-group-groups.json", b"x" * 10_000_000,
                                       {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 413
        # On a hook, in the hooks' one error shape (doc/hooks.rst, issue 15)...
        assert body == {"status": 100, "message": ["request body larger than 1024 bytes"]}
        # ...elsewhere in the site's.
        status, body = mailhub.request("POST", "/mailstore", b"x" * 10_000_000,
                                       {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 413
        assert body == {"error": "request body larger than 1024 bytes"}


def test_tac_file_runs_the_same_service(tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, MAILHUB_LISTEN="tcp:%d:interface=127.0.0.1" % port)
    mailhub = Mailhub(tmp_path, port=port)
    mailhub.args = [TWISTD, "-ny", str(ROOT / "tac" / "mailhub.tac"), "--pidfile="]
    mailhub.env = env
    with mailhub:
        assert mailhub.get("/healthz")[0] == 200


def test_installed_wheel_provides_the_twistd_plugin(tmp_path: Path, mailhub_wheel: Path) -> None:
    wheel = mailhub_wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/mailhub_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    # -S: no site-packages processing, so the checkout (on sys.path through the
    # editable install's .pth) is not seen; only the wheel and the dependencies.
    path = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])
    done = subprocess.run([sys.executable, "-S", "-c",
                           "import sys; from twisted.scripts.twistd import run; "
                           "sys.argv = ['twistd', '--help']; run()"],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=path),
                          capture_output=True, text=True, timeout=120)
    assert "mailhub" in done.stdout, done.stdout + done.stderr
    import_check = subprocess.run([sys.executable, "-S", "-c", "import mailhub; print(mailhub.__file__)"],
                                  cwd=tmp_path, env=dict(os.environ, PYTHONPATH=path),
                                  capture_output=True, text=True, timeout=60)
    assert import_check.stdout.startswith(str(target))


@pytest.mark.parametrize("argv", [["--version"]])
def test_plugin_options(tmp_path: Path, argv: list[str]) -> None:
    done = subprocess.run([TWISTD, "mailhub", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "mailhub 0.1.0"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_hooks_follow_the_cli_without_a_restart(tmp_path: Path, backend: str) -> None:
    mailhub_cli = str(Path(sys.executable).with_name("mailhub"))

    def run(config: Path, *args: str) -> str:
        done = subprocess.run([mailhub_cli, *args, "--config", str(config)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, check=True)
        return done.stdout

    def scenario(config_text: str) -> None:
        with Mailhub(tmp_path, config=config_text) as mailhub:
            config = tmp_path / "mailhub.ini"
            first = run(config, "token", "create").splitlines()[1]
            run(config, "group", "add", "example", "--name", "Example")
            status, groups = mailhub.post_form("/gs-group-groups.json", "token=%s&get" % first)
            assert (status, [g["id"] for g in groups]) == (200, ["example"])
            second = run(config, "token", "create").splitlines()[1]
            # The new token works at once; the old one is refused once the
            # change log has been read (every poll_interval).
            status, _ = mailhub.post_form("/gs-group-groups.json", "token=%s&get" % second)
            assert status == 200
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                status, body = mailhub.post_form("/gs-group-groups.json", "token=%s&get" % first)
                if status == 403:
                    break
                time.sleep(0.1)
            assert status == 403 and body["status"] == 100
        store = SQLStore(dialect_for(dsn))
        try:
            rows = [r for r in result_of(store.audit_log(50)) if r["event"] == "token-mismatch"]
        finally:
            store.close_all()
        assert rows and rows[0]["client"] == "127.0.0.1"
        assert all(first not in r["detail"] and second not in r["detail"] for r in rows)

    if backend == "sqlite":
        dsn = "sqlite:///%s" % (tmp_path / "hub.sqlite")
        scenario("[database]\ndsn = %s\n" % dsn)
    else:
        with throwaway_database() as dsn:
            scenario("[database]\ndsn = %s\n" % dsn)


def test_multipart_forms_are_parsed_and_malformed_ones_get_json_400(tmp_path: Path) -> None:
    with Mailhub(tmp_path) as mailhub:
        good = (b"--XyZ\r\nContent-Disposition: form-data; name=\"search\"\r\n\r\n\r\n"
                b"--XyZ\r\nContent-Disposition: form-data; name=\"user\"\r\n\r\nnobody@example.com\r\n"
                b"--XyZ\r\nContent-Disposition: form-data; name=\"token\"\r\n\r\nwrong\r\n--XyZ--\r\n")
        status, body = mailhub.request("POST", "/gs-search-people.json", good,
                                       {"Content-Type": "multipart/form-data; boundary=XyZ"})
        # The fields were read: the action and the (wrong) token count.
        assert status == 403 and body["status"] == 100
        status, body = mailhub.request("POST", "/gs-search-people.json", b"--nope\r\ngarbage",
                                       {"Content-Type": "multipart/form-data; boundary=XyZ"})
        assert status == 400
        assert body == {"status": 100, "message": ["the multipart/form-data body is malformed"]}


@pytest.mark.parametrize("text, says", [
    ("[amqp]\nurl = amqp://guest:guest@127.0.0.1:5672/\nspec = /nonexistent/amqp.xml\n",
     "[amqp] spec: /nonexistent/amqp.xml not found: install Debian's amqp-specs package"),
    ("[mailhub]\nlisten = nonsense:1\n", "[mailhub] listen: bad value 'nonsense:1': Unknown endpoint type"),
    ("[mailhub]\nlisten = nonsense\n", "[mailhub] listen: bad value 'nonsense': Unknown endpoint type"),
    ("[mailhub]\nlisten = ssl:8443:privateKey=/nonexistent/key.pem\n",
     "[mailhub] listen: bad value 'ssl:8443:privateKey=/nonexistent/key.pem': "
     "No such file or directory: /nonexistent/key.pem"),
    ("[mailhub]\ndata = mailhub.ini\n", "[mailhub] data: bad value: mailhub.ini is a file, not a folder"),
    ("[mailhub]\nmax_connections = 10\nhealth_reserve = 10\n",
     "[mailhub] health_reserve: bad value: must be smaller than max_connections (10)"),
    ("[carddav]\nurl = https://dav.example.com/\naddressbook = https://dav.example.com/books/\n",
     "[carddav] addressbook: bad value"),
])
def test_unusable_settings_found_while_wiring_stop_start_up_with_one_line(
        tmp_path: Path, text: str, says: str) -> None:
    config = tmp_path / "mailhub.ini"
    config.write_text(text)
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "mailhub", "--config", str(config)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("mailhub: configuration error: %s: " % config)
    assert says in lines[0]


def test_listen_option_errors_name_the_option(tmp_path: Path) -> None:
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "mailhub", "--listen", "tcp:notaport"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["mailhub: configuration error: --listen: bad value 'tcp:notaport': "
                     "invalid literal for int() with base 10: 'notaport'"]


def test_a_port_in_use_ends_the_process_with_one_line_and_exit_code_1(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        done = subprocess.run([TWISTD, "-n", "--pidfile=", "mailhub",
                               "--listen", "tcp:%d:interface=127.0.0.1" % port],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    failures = [line for line in output.splitlines() if "cannot listen" in line]
    assert len(failures) == 1, output
    assert failures[0].endswith("mailhub: cannot listen on tcp:%d:interface=127.0.0.1: "
                                "Address already in use" % port)
    assert "Traceback" not in output and "mailhub is ready" not in output


def test_a_port_in_use_ends_a_daemonized_twistd_too(tmp_path: Path) -> None:
    """Daemonized, twistd's parent waits for its child's word: it must get one."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    pidfile, logfile = tmp_path / "twistd.pid", tmp_path / "twistd.log"
    try:
        done = subprocess.run([TWISTD, "--pidfile", str(pidfile), "--logfile", str(logfile),
                               "mailhub", "--listen", "tcp:%d:interface=127.0.0.1" % port],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "mailhub: cannot listen on tcp:%d" % port in done.stderr
    assert not pidfile.exists()
    log = logfile.read_text()
    assert [line for line in log.splitlines() if "cannot listen" in line], log
    assert "Traceback" not in log


def test_start_up_logs_what_it_uses_once_without_secrets(tmp_path: Path) -> None:
    config = ("[database]\ndsn = %s\n[amqp]\nurl = amqp://guest:broker-secret@127.0.0.1:1/\n"
              "[ldap]\nurl = ldap://127.0.0.1:1 ldaps://127.0.0.2:1\n"
              "base_dn = dc=example,dc=com\nbind_password = ldap-secret\n")
    dsn = "sqlite:///%s" % (tmp_path / "hub.sqlite")
    with Mailhub(tmp_path, config=config % dsn) as mailhub:
        pass
    log = mailhub.log.read_text()
    lines = [line for line in log.splitlines() if "mailhub starting:" in line]
    assert len(lines) == 1, log
    line = lines[0]
    assert "listen tcp:%d:interface=127.0.0.1" % mailhub.port in line
    assert "data %s" % (tmp_path / "mailhub-data") in line
    assert "database %s" % dsn in line
    assert "broker amqp://guest:***@127.0.0.1:1/" in line
    assert "CardDAV embedded at http://localhost:8080/dav/" in line
    assert "LDAP ldap://127.0.0.1:1 ldaps://127.0.0.2:1" in line
    assert "config %s" % (tmp_path / "mailhub.ini") in line
    assert "secret" not in log
