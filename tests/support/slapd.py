"""A throwaway OpenLDAP server (Debian's slapd) for tests and benchmarks.

``with Slapd(tmpdir, users=1200) as ldap: ...`` writes a slapd.conf (core,
cosine and inetOrgPerson schemas, an mdb database in ``tmpdir``), loads the
generated users with ``slapadd`` (offline, fast even for 100,000 users),
starts ``slapd`` on a free port of 127.0.0.1 and waits until it answers;
leaving the block stops it and removes nothing but its process (the caller
owns ``tmpdir``).

The directory (base ``dc=example,dc=test``):

- ``cn=admin,dc=example,dc=test`` (``rootdn``, password ``ROOT_PASSWORD``);
- ``cn=reader,ou=services,...`` (``READER_PASSWORD``): the service account
  mailhub binds as. Searches by it are limited to ``SIZE_LIMIT`` (500)
  entries unless paged, like Active Directory's MaxPageSize, so a listing
  that forgets to page is caught;
- ``uid=userNNNNN,ou=people,...`` for N in ``range(users)``: cn with
  non-ASCII letters, two ``mail`` values, password ``password(N)``;
- ``uid=zoe``: "Zoë Ørsted-Ünal" with three mail values, password
  ``"Pässwörd zoë"`` (non-ASCII password).

:func:`shared` is the one such server of a test run (1,200 users, TLS too),
started on first use and stopped when the run ends (the root conftest's
``slapd`` fixture and its ``pytest_sessionfinish``): the LDAP, MailStore and
event-stream tests all read the same directory. A test that pauses it
resumes it before it ends; none writes to it.

``pause()``/``resume()`` stop and continue the process (SIGSTOP/SIGCONT):
the server then accepts TCP connections but never answers, which is how a
hung LDAP server looks to a client.

``Slapd(tmpdir, tls=True)`` also serves TLS: a throwaway CA and a server
certificate (for ``tls_names``, by default 127.0.0.1 and localhost) are
written to ``tmpdir/tls`` by :func:`make_certificates`, and slapd listens
on ``url`` (plain, offering StartTLS) and on ``ldaps_url`` (TLS from the
first byte). ``ca_file`` is the CA a client must trust. slapd runs as the
user running the tests (it is never told to switch user), so the key file
is that user's own, mode 0600.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Sequence

import pytest

from tests.support.require import free_port

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
SCHEMA = "/etc/ldap/schema"
MODULES = "/usr/lib/ldap"
BASE_DN = "dc=example,dc=test"
ROOT_DN = "cn=admin," + BASE_DN
ROOT_PASSWORD = "root-secret"
READER_DN = "cn=reader,ou=services," + BASE_DN
READER_PASSWORD = "reader-secret"
SIZE_LIMIT = 500
ZOE_PASSWORD = "Pässwörd zoë"


def login(n: int) -> str:
    """The uid of generated user ``n``."""
    return "user%05d" % n


def password(n: int) -> str:
    """The password of generated user ``n``."""
    return "pw-%05d-secret" % n


def full_name(n: int) -> str:
    """The cn of generated user ``n`` (non-ASCII on purpose)."""
    return "Jörg Nüßlein %05d" % n


def emails(n: int) -> list[str]:
    """The mail values of generated user ``n``."""
    return ["%s@example.test" % login(n), "j.nuesslein.%05d@mail.example.test" % n]


def _value(name: str, value: str) -> str:
    """An LDIF line, base64-encoded when the value is not plain ASCII."""
    if value.isascii() and not value.startswith((" ", ":", "<")) and "\n" not in value:
        return "%s: %s\n" % (name, value)
    return "%s:: %s\n" % (name, base64.b64encode(value.encode("utf-8")).decode("ascii"))


def _entry(dn: str, attributes: list[tuple[str, str]]) -> str:
    return _value("dn", dn) + "".join(_value(k, v) for k, v in attributes) + "\n"


def ldif(users: int) -> str:
    """The whole test directory as LDIF."""
    parts = [
        _entry(BASE_DN, [("objectClass", "dcObject"), ("objectClass", "organization"),
                         ("dc", "example"), ("o", "Example")]),
        _entry("ou=people," + BASE_DN, [("objectClass", "organizationalUnit"), ("ou", "people")]),
        _entry("ou=services," + BASE_DN, [("objectClass", "organizationalUnit"),
                                          ("ou", "services")]),
        _entry(READER_DN, [("objectClass", "organizationalRole"),
                           ("objectClass", "simpleSecurityObject"),
                           ("cn", "reader"), ("userPassword", READER_PASSWORD)]),
        _entry("uid=zoe,ou=people," + BASE_DN, [
            ("objectClass", "inetOrgPerson"), ("uid", "zoe"), ("cn", "Zoë Ørsted-Ünal"),
            ("sn", "Ørsted-Ünal"), ("mail", "zoe@example.test"),
            ("mail", "zoe.orsted@example.test"), ("mail", "Z.Orsted@Example.Test"),
            ("userPassword", ZOE_PASSWORD)]),
    ]
    for n in range(users):
        attributes = [("objectClass", "inetOrgPerson"), ("uid", login(n)),
                      ("cn", full_name(n)), ("sn", "Nüßlein"),
                      ("userPassword", password(n))]
        attributes += [("mail", m) for m in emails(n)]
        parts.append(_entry("uid=%s,ou=people,%s" % (login(n), BASE_DN), attributes))
    return "".join(parts)


@dataclass(frozen=True)
class TLSFiles:
    """The PEM files of one throwaway CA and the server certificate it signed."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_certificates(directory: str | os.PathLike[str],
                      names: Sequence[str] = ("127.0.0.1", "localhost")) -> TLSFiles:
    """A new CA and a server certificate for ``names`` (IP addresses or DNS names).

    Written as PEM into ``directory`` (created): ``ca.pem``, ``server.pem``
    and ``server.key`` (mode 0600). ECDSA P-256, valid from an hour ago
    for a day: made in milliseconds, no network.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                            "mailhub test CA %s" % os.urandom(4).hex())])
    ca = (x509.CertificateBuilder()
          .subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(hours=1))
          .not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(
              digital_signature=True, content_commitment=False, key_encipherment=False,
              data_encipherment=False, key_agreement=False, key_cert_sign=True,
              crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alternatives: list[x509.GeneralName] = []
    for name in names:
        try:
            alternatives.append(x509.IPAddress(ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = TLSFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    files.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    descriptor = os.open(files.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return files


def _tls_config(files: TLSFiles) -> str:
    return """\
TLSCACertificateFile {ca}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
""".format(ca=files.ca_file, cert=files.cert_file, key=files.key_file)


def _config(directory: Path, tls: TLSFiles | None = None) -> str:
    return (_tls_config(tls) if tls is not None else "") + """\
include {schema}/core.schema
include {schema}/cosine.schema
include {schema}/inetorgperson.schema
modulepath {modules}
moduleload back_mdb
pidfile {dir}/slapd.pid
argsfile {dir}/slapd.args
threads 4

database mdb
maxsize 4294967296
suffix "{base}"
rootdn "{root}"
rootpw {root_password}
directory {dir}/data
index objectClass eq
index uid,mail eq
access to attrs=userPassword
    by anonymous auth
    by self write
    by * none
access to *
    by * read
limits dn.exact="{reader}" size.soft={limit} size.hard={limit} size.pr={limit} size.prtotal=unlimited
limits anonymous size.soft={limit} size.hard={limit} size.pr={limit} size.prtotal=unlimited
""".format(schema=SCHEMA, modules=MODULES, dir=directory, base=BASE_DN, root=ROOT_DN,
           root_password=ROOT_PASSWORD, reader=READER_DN, limit=SIZE_LIMIT)


class Slapd:
    """One slapd process with the generated directory; a context manager."""

    def __init__(self, directory: str | os.PathLike[str], users: int = 1200,
                 start_timeout: float = 20.0, tls: bool = False,
                 tls_names: Sequence[str] = ("127.0.0.1", "localhost")) -> None:
        self.directory = Path(directory)
        self.users = users
        self.start_timeout = start_timeout
        self.tls = tls
        self.tls_names = tuple(tls_names)
        self.port = 0
        #: The ldaps:// port (0 without ``tls``).
        self.tls_port = 0
        #: The CA, server certificate and key files (None without ``tls``).
        self.tls_files: TLSFiles | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return "ldap://127.0.0.1:%d" % self.port

    @property
    def ldaps_url(self) -> str:
        """The LDAPS URL (only with ``tls``)."""
        if not self.tls_port:
            raise RuntimeError("this slapd serves no LDAPS (start it with tls=True)")
        return "ldaps://127.0.0.1:%d" % self.tls_port

    @property
    def ca_file(self) -> str:
        """The CA certificate (PEM) that signed the server's certificate."""
        if self.tls_files is None:
            raise RuntimeError("this slapd has no certificate (start it with tls=True)")
        return str(self.tls_files.ca_file)

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for LDAPSection that point at this server.

        ``urls`` (a sequence of servers, in failover order) may be given
        instead of ``url``.
        """
        values: dict[str, Any] = {
            "url": self.url, "base_dn": BASE_DN, "bind_dn": READER_DN,
            "bind_password": READER_PASSWORD,
        }
        if "urls" in overrides:
            overrides = dict(overrides)
            values["url"] = " ".join(overrides.pop("urls"))
        values.update(overrides)
        return values

    def start(self) -> "Slapd":
        if not (os.access(SLAPD, os.X_OK) and os.access(SLAPADD, os.X_OK)):
            pytest.skip("slapd is not installed (Debian package slapd; tests/run installs it)")
        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.tls_files = make_certificates(self.directory / "tls", self.tls_names)
        conf = self.directory / "slapd.conf"
        conf.write_text(_config(self.directory, self.tls_files), encoding="utf-8")
        data = self.directory / "users.ldif"
        data.write_text(ldif(self.users), encoding="utf-8")
        loaded = subprocess.run([SLAPADD, "-q", "-f", str(conf), "-l", str(data)],
                                capture_output=True, timeout=600)
        if loaded.returncode != 0:
            raise RuntimeError("slapadd failed: %s" % loaded.stderr.decode("utf-8", "replace"))
        data.unlink()
        self.port = free_port()
        listeners = [self.url + "/"]
        ports = [self.port]
        if self.tls:
            self.tls_port = free_port()
            while self.tls_port == self.port:
                self.tls_port = free_port()
            listeners.append(self.ldaps_url + "/")
            ports.append(self.tls_port)
        with open(self.directory / "slapd.log", "wb") as log:
            # slapd writes to its own copy of the descriptor; ours is closed.
            self.process = subprocess.Popen(
                [SLAPD, "-f", str(conf), "-h", " ".join(listeners), "-d", "0"],
                stdout=subprocess.DEVNULL, stderr=log,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("slapd exited with %s: %s" % (
                    self.process.returncode,
                    (self.directory / "slapd.log").read_text("utf-8", "replace")[-2000:]))
            try:
                for port in ports:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("slapd did not listen within %s s" % self.start_timeout)

    def pause(self) -> None:
        """Freeze the server: connections are accepted, nothing is answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self._paused = False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if self._paused:
            process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> "Slapd":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: The users of the :func:`shared` directory: more than two pages of 500.
SHARED_USERS = 1200

_shared: Slapd | None = None


def shared() -> Slapd:
    """The test run's one slapd (``SHARED_USERS`` users, plain and TLS), started once.

    Tests may pause and resume it, never change its entries.
    """
    global _shared
    if _shared is None or _shared.process is None or _shared.process.poll() is not None:
        stop_shared()
        made = Slapd(tempfile.mkdtemp(prefix="mailhub-slapd-"), users=SHARED_USERS, tls=True)
        try:
            made.start()
        except BaseException:
            made.stop()
            shutil.rmtree(made.directory, ignore_errors=True)
            raise
        _shared = made
    if _shared._paused:
        _shared.resume()
    return _shared


def stop_shared() -> None:
    """Stop the :func:`shared` server, if one was started, and remove its folder."""
    global _shared
    made, _shared = _shared, None
    if made is not None:
        made.stop()
        shutil.rmtree(made.directory, ignore_errors=True)
