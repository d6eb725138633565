"""The baseline for cmd=list: raw ldap3 paged search writing the same JSON.

Usage: baseline.py LDAP_URL BASE_DN BIND_DN BIND_PASSWORD OUTPUT
Writes the array MailStore would get, page by page, to OUTPUT; prints the
number of users and the seconds taken (interpreter start-up excluded).
"""

from __future__ import annotations

import json
import sys
import time

from ldap3 import NONE, SUBTREE, Connection, Server


def main() -> None:
    url, base, bind_dn, password, output = sys.argv[1:6]
    started = time.monotonic()
    conn = Connection(Server(url, get_info=NONE), bind_dn, password, auto_bind=True)
    cookie = None
    first = True
    count = 0
    with open(output, "wb") as out:
        out.write(b"[")
        while True:
            conn.search(base, "(objectClass=inetOrgPerson)", SUBTREE,
                        attributes=["uid", "cn", "mail"], paged_size=500, paged_cookie=cookie)
            for entry in conn.response:
                if entry.get("type") != "searchResEntry":
                    continue
                raw = entry["raw_attributes"]
                item = {"userName": raw["uid"][0].decode(), "distinguishedName": entry["dn"],
                        "fullName": raw["cn"][0].decode(),
                        "emailAddresses": [m.decode() for m in raw.get("mail", [])]}
                out.write((b"" if first else b",") + json.dumps(
                    item, ensure_ascii=False, separators=(",", ":")).encode())
                first = False
                count += 1
            cookie = conn.result["controls"]["1.2.840.113556.1.4.319"]["value"]["cookie"]
            if not cookie:
                break
        out.write(b"]")
    conn.unbind()
    print(count, time.monotonic() - started)


if __name__ == "__main__":
    main()
