"""Pure parts of the LDAP source: filters, entries, settings (no server)."""

from __future__ import annotations

from mailhub.config import LDAPSection, parse
from mailhub.directory.ldap import LDAPService, user_filter, user_of_entry

AD = LDAPSection(
    url="ldaps://dc1.example.test ldaps://dc2.example.test",
    base_dn="DC=example,DC=test",
    login_attribute="sAMAccountName", name_attribute="displayName",
    mail_attribute="mail proxyAddresses", dn_attribute="distinguishedName",
)


def test_the_login_is_escaped_never_pasted_into_the_filter() -> None:
    template = "(&(objectClass=inetOrgPerson)(|(uid={login})(mail={login})))"
    assert user_filter(template, "*)(uid=*") == (
        "(&(objectClass=inetOrgPerson)(|(uid=\\2a\\29\\28uid=\\2a)(mail=\\2a\\29\\28uid=\\2a)))")
    assert user_filter("(uid={login})", "a\\b\x00") == "(uid=a\\5cb\\00)"
    assert user_filter("(cn={login})", "Jörg") == "(cn=Jörg)"


def test_active_directory_entries_use_the_configured_attributes() -> None:
    entry = {
        "dn": "CN=Jane Doe,OU=Staff,DC=example,DC=test",
        "raw_attributes": {
            "sAMAccountName": [b"jane.doe"],
            "displayName": ["Jane Doe".encode()],
            "mail": [b"jane.doe@example.test"],
            "proxyAddresses": [b"SMTP:jane.doe@example.test", b"smtp:jane@example.test",
                               b"X500:/o=Example/ou=First", b"SIP:jane@example.test"],
            "distinguishedName": [b"CN=Jane Doe,OU=Staff,DC=example,DC=test"],
        },
    }
    user = user_of_entry(AD, entry)
    assert user is not None
    assert user.login == "jane.doe" and user.name == "Jane Doe"
    assert user.emails == ("jane.doe@example.test", "jane@example.test")
    assert user.mailstore() == {
        "userName": "jane.doe",
        "distinguishedName": "CN=Jane Doe,OU=Staff,DC=example,DC=test",
        "fullName": "Jane Doe",
        "emailAddresses": ["jane.doe@example.test", "jane@example.test"],
    }


def test_an_entry_without_a_login_is_not_a_user() -> None:
    assert user_of_entry(AD, {"dn": "CN=x", "raw_attributes": {"displayName": [b"x"]}}) is None


def test_settings_come_from_the_ldap_section() -> None:
    config = parse("""
[ldap]
url = ldap://a.example.test ldaps://b.example.test
bind_dn = cn=reader,dc=example,dc=test
bind_password = s3cret
base_dn = dc=example,dc=test
mail_attribute = mail proxyAddresses
dn_attribute = distinguishedName
timeout = 2.5
""")
    settings = config.ldap  # the section is what the client reads: one type
    assert settings.urls == ("ldap://a.example.test", "ldaps://b.example.test")
    assert settings.mail_attributes == ("mail", "proxyAddresses")
    assert settings.attributes == ["uid", "cn", "mail", "proxyAddresses", "distinguishedName"]
    assert "s3cret" not in repr(settings)


def test_no_url_means_no_ldap_service() -> None:
    assert LDAPService.from_config(object(), parse("").ldap) is None
