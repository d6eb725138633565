"""The site directory: profiles, groups, memberships, the token, users.

:mod:`~mailhub.directory.model` holds plain values (and the outcomes of
membership changes, :class:`~mailhub.directory.model.Added` and
:class:`~mailhub.directory.model.Left`); the stores in
:mod:`~mailhub.directory.sql` keep them in SQLite or PostgreSQL; the
:class:`~mailhub.directory.service.Directory` service keeps an exact in-memory
copy for the hot read paths; user sources (:mod:`~mailhub.directory.users`,
:mod:`~mailhub.directory.ldap`) answer "who is this and is the password right".
:mod:`~mailhub.directory.ldap_wire` is the quarantined LDAP login fast path
(ldap3 internals, pinned to one ldap3 release). Nothing here knows HTTP.
"""
