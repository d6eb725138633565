"""A three-node RabbitMQ cluster on 127.0.0.1 for the cluster tests.

Started once per test session, by the first test that asks for it
(:func:`shared`), and stopped when the run ends (a session fixture of
``tests/cluster/conftest.py``). Everything is its own: node names
(``mhc<pid><random>-<n>@localhost``), AMQP and
distribution ports, Erlang cookie, and the Mnesia, log and configuration
folders in a temporary folder; management and every other plugin off. The
machine's own broker (``rabbit@localhost``, port 5672, its cookie and
``/etc/rabbitmq``) is left alone: the server and ``rabbitmqctl`` are run from
``/usr/lib/rabbitmq/bin`` as the current user, with
``RABBITMQ_CONF_ENV_FILE`` pointing at the cluster's own (empty) one.

How it starts, fast: the three nodes boot at the same time, nodes 2 and 3
configured to join node 1 by classic peer discovery as they boot (waiting
for it if need be), which their logs confirm; then one ``rabbitmqctl
enable_feature_flag all`` (a node that joined node 1 while it booted can
leave ``quorum_queue`` off); a node that booted alone all
the same joins the usual way (``rabbitmqctl stop_app``, ``join_cluster``,
``start_app``: about 45 s more on a loaded machine, hence peer discovery).
``started_in`` and ``phases`` record the seconds it took (the quorum test
prints them): 25 to 40 s on the shared 2-core machine.

A missing ``rabbitmq-server`` or a cluster that does not come up skips the
tests (a failure under ``CI=true``, see :mod:`tests.support.ci`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.require import free_port

BIN = Path("/usr/lib/rabbitmq/bin")
SERVER = BIN / "rabbitmq-server"
CTL = BIN / "rabbitmqctl"
QUEUES = BIN / "rabbitmq-queues"
HOST = "127.0.0.1"
SIZE = 3


class Node:
    """One node of the cluster: its name, ports, folder and process."""

    def __init__(self, cluster: "Cluster", index: int) -> None:
        self.cluster = cluster
        self.index = index
        self.name = "%s-%d@localhost" % (cluster.prefix, index + 1)
        self.port = free_port()
        self.dist_port = free_port()
        self.folder = cluster.folder / ("node%d" % (index + 1))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``amqp://guest:guest@127.0.0.1:PORT/`` of this node alone."""
        return "amqp://guest:guest@%s:%d/" % (HOST, self.port)

    def env(self) -> dict[str, str]:
        """The environment ``rabbitmq-server`` runs this node with."""
        env = self.cluster.env()
        env.update({
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(self.port),
            # Sets inet_dist_listen_min and _max to this one port.
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.folder / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.folder / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.folder / "rabbit.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def prepare(self, join: str | None = None) -> None:
        """Write the node's folders and configuration; ``join``: the node
        it joins as it boots (classic peer discovery)."""
        for sub in ("mnesia", "log"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        conf = ("listeners.tcp.1 = %s:%d\n"
                "log.console = false\n"
                "log.file.level = info\n"
                "vm_memory_high_watermark.relative = 0.8\n"
                "disk_free_limit.absolute = 50MB\n" % (HOST, self.port))
        if join is not None:
            # Booted at the same time as ``join``: wait for it (up to a
            # minute) rather than form a cluster of one.
            conf += ("cluster_formation.peer_discovery_backend = classic_config\n"
                     "cluster_formation.classic_config.nodes.1 = %s\n"
                     "cluster_formation.randomized_startup_delay_range.min = 0\n"
                     "cluster_formation.randomized_startup_delay_range.max = 1\n"
                     "cluster_formation.discovery_retry_limit = 240\n"
                     "cluster_formation.discovery_retry_interval = 250\n" % join)
        (self.folder / "rabbitmq.conf").write_text(conf)
        (self.folder / "advanced.config").write_text("[].\n")
        (self.folder / "enabled_plugins").write_text("[].\n")

    def start(self) -> None:
        """Boot the node (without waiting for it: see :meth:`Cluster.await_startup`)."""
        with open(self.folder / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [str(SERVER)], env=self.env(), cwd=self.folder, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def joined_by_discovery(self) -> bool:
        """Whether the node's log says peer discovery had it join node 1."""
        log = self.folder / "log" / ("%s.log" % self.name)
        return log.exists() and "selected for auto-clustering" in log.read_text(errors="replace")

    def kill(self) -> None:
        """Kill the node at once (SIGKILL to its Erlang VM), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ctl(self, *args: str, timeout: float = 60, tool: Path = CTL) -> str:
        """``rabbitmqctl -n NODE args...``; its output, or AssertionError."""
        done = subprocess.run([str(tool), "-n", self.name, *args], env=self.cluster.env(),
                              capture_output=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError("%s %s on %s failed (%d): %s%s" % (
                tool.name, " ".join(args), self.name, done.returncode,
                done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")))
        return done.stdout.decode()

    def await_startup(self, timeout: float = 90) -> None:
        """Wait until the node accepts AMQP connections (or fail saying why).

        Polling the AMQP port is much cheaper than ``rabbitmqctl
        await_startup`` (a CLI run boots an Erlang VM, and fails at once
        while the node is not yet registered with epmd); RabbitMQ opens its
        listener at the end of its boot.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                break
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        log = ""
        for path in [self.folder / "server.log", *sorted((self.folder / "log").glob("*.log"))]:
            if path.exists():
                log += "%s:\n%s\n" % (path, path.read_text(errors="replace")[-2000:])
        raise AssertionError("RabbitMQ node %s did not start (%s)\n%s" % (
            self.name, "exited" if self.process is not None and self.process.poll() is not None
            else "timed out", log))


class Cluster:
    """Three RabbitMQ nodes clustered together; see the module docstring."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.prefix = "mhc%d%s" % (os.getpid(), secrets.token_hex(2))
        self.home = folder / "home"
        self.cookie = secrets.token_hex(16)
        self.nodes = [Node(self, i) for i in range(SIZE)]
        self.started_in = 0.0
        #: Seconds each step of :meth:`start` took.
        self.phases: dict[str, float] = {}

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated: an ``[amqp] url`` for the cluster."""
        return ",".join(node.url for node in self.nodes)

    def env(self) -> dict[str, str]:
        """The environment shared by the nodes and ``rabbitmqctl``: the cluster's cookie."""
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.home),
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "RABBITMQ_CONF_ENV_FILE": str(self.folder / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": HOST,
        }

    def start(self) -> None:
        """Boot the three nodes and cluster them; ``started_in`` says how long it took."""
        begun = time.monotonic()
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)
        (self.folder / "rabbitmq-env.conf").write_text("")
        first = self.nodes[0]
        for node in self.nodes:
            node.prepare(join=None if node is first else first.name)
            node.start()
        for node in self.nodes:
            node.await_startup()
        self.phases["boot"] = time.monotonic() - begun
        # Peer discovery clustered them, as their logs say (a rabbitmqctl
        # cluster_status would cost seconds); a node that booted alone all
        # the same joins the classic way.
        # A node that joined node 1 while node 1 was still booting may leave
        # the cluster with feature flags off (quorum_queue among them: quorum
        # queues are then refused); turn every one on.
        began = time.monotonic()
        first.ctl("enable_feature_flag", "all")
        self.phases["feature flags"] = time.monotonic() - began
        for node in self.nodes[1:]:
            if not node.joined_by_discovery():
                for command in (["stop_app"], ["join_cluster", first.name], ["start_app"]):
                    began = time.monotonic()
                    node.ctl(*command)
                    self.phases["%s %s" % (command[0], node.name)] = time.monotonic() - began
        self.started_in = time.monotonic() - begun

    def restart(self, node: Node) -> None:
        """Boot a killed node again and wait until it is back in the cluster."""
        node.start()
        node.await_startup()

    def stop(self) -> None:
        """Kill every node and delete the cluster's folder."""
        for node in self.nodes:
            node.kill()
        if not os.environ.get("MAILHUB_KEEP_CLUSTER"):
            shutil.rmtree(self.folder, ignore_errors=True)

    def running_nodes(self) -> list[Node]:
        return [node for node in self.nodes if node.running]

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl`` on a running node."""
        return self.running_nodes()[0].ctl(*args, timeout=timeout)

    def queue_leader(self, queue: str) -> Node:
        """The node leading the quorum queue ``queue`` now."""
        out = self.ctl("list_queues", "-q", "--no-table-headers", "name", "leader")
        for line in out.splitlines():
            name, _, leader = line.partition("\t")
            if name == queue:
                for node in self.nodes:
                    if node.name == leader.strip():
                        return node
                raise AssertionError("queue %s is led by %r, not a node of the cluster"
                                     % (queue, leader))
        raise AssertionError("no queue %s in the cluster" % queue)

    def queue_counts(self, queue: str) -> tuple[int, int]:
        """``(ready, unacknowledged)`` messages of ``queue``."""
        out = self.ctl("list_queues", "-q", "--no-table-headers", "name", "messages_ready",
                       "messages_unacknowledged")
        for line in out.splitlines():
            row = line.split("\t")
            if row[0] == queue:
                return int(row[1]), int(row[2])
        raise AssertionError("no queue %s in the cluster" % queue)


_shared: Cluster | None = None
_failed: str | None = None


def shared() -> Cluster:
    """The run's one cluster, started on first use; skips when it cannot start."""
    global _shared, _failed
    if _shared is not None:
        return _shared
    if _failed is not None:
        pytest.skip(_failed)
    if not SERVER.exists() or not CTL.exists():
        _failed = "rabbitmq-server is not installed (%s)" % SERVER
        pytest.skip(_failed)
    # Two tries: a port found free may be taken by another program before
    # the node listens on it (the machine is shared with other test runs).
    for attempt in range(2):
        cluster = Cluster(Path(tempfile.mkdtemp(prefix="mailhub-rabbit-cluster-")))
        try:
            cluster.start()
        except (AssertionError, OSError, subprocess.TimeoutExpired) as e:
            cluster.stop()
            _failed = "the 3-node RabbitMQ cluster did not start: %s" % e
            continue
        _failed = None
        _shared = cluster
        return cluster
    assert _failed is not None
    pytest.skip(_failed)


def stop_shared() -> None:
    """Stop the run's cluster, if one was started."""
    global _shared
    if _shared is not None:
        _shared.stop()
        _shared = None


def main() -> Any:  # pragma: no cover - a manual check: python -m tests.support.rabbit_cluster
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="mailhub-rabbit-cluster-")))
    try:
        cluster.start()
        print("started in %.1f s: %s" % (cluster.started_in, cluster.url))
        print(cluster.phases)
        print(cluster.ctl("cluster_status"))
    finally:
        cluster.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
