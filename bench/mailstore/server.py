"""mailhub's MailStore surface alone, for bench/mailstore/run.py (a subprocess).

Usage: server.py PORT LDAP_URL BASE_DN BIND_DN BIND_PASSWORD THREADS
Prints "ready" when listening. The chain is the production one: site users
(an empty in-memory store, looked up through the loaded in-memory Directory
as mailhub.tap wires it) first, then LDAP. THREADS is ``[ldap] pool_size``:
run.py passes its concurrency, so mailhub has as many LDAP connections as
the raw baseline has threads.
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from mailhub.web.site import MailhubSite, Root

from mailhub.config import Config, LDAPSection, MailStoreSection
from mailhub.directory.service import Directory
from mailhub.directory.ldap import LDAPService
from mailhub.directory.memory import MemoryStore
from mailhub.auth import Throttle
from mailhub.directory.users import ChainedUserSource, HashingService, SiteUserSource
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.web.mailstore import MailStoreIntegration


def main() -> None:
    port, url, base, bind_dn, bind_password, threads = sys.argv[1:7]
    settings = LDAPSection(url=url, base_dn=base, bind_dn=bind_dn,
                            bind_password=bind_password, timeout=10.0)
    ldap = LDAPService(reactor, settings, threads=int(threads))
    hashing = HashingService()
    ldap.startService()
    hashing.startService()
    store = MemoryStore()
    directory = Directory(store, reactor)
    Deferred.fromCoroutine(directory.load())  # the in-memory store answers at once
    site = SiteUserSource(store, reactor, hashing.pool, directory=directory)
    chain = ChainedUserSource([site, ldap.source])
    config = Config(mailstore=MailStoreSection(username="mailstore", password="bench"),
                    ldap=LDAPSection(page_size=500))
    surface = MailStoreIntegration(config, chain, Hub(), Metrics(), reactor,
                                   throttle=Throttle(reactor))
    # mailhub's own Site and Root, as twistd mailhub serves it.
    metrics = Metrics()
    root = Root(metrics)
    root.mount_at("/mailstore", surface.resource())
    reactor.listenTCP(int(port), MailhubSite(root, config.mailhub.max_body),
                      interface="127.0.0.1")
    reactor.addSystemEventTrigger("before", "shutdown", ldap.stopService)
    reactor.addSystemEventTrigger("before", "shutdown", hashing.stopService)
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
