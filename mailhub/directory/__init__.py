"""The site directory: profiles, groups, memberships, the token, users.

:mod:`~mailhub.directory.model` holds plain values; the stores in
:mod:`~mailhub.directory.sql` keep them in SQLite or PostgreSQL; the
:mod:`~mailhub.directory.service` keeps an exact in-memory copy for the hot read
paths; user sources (:mod:`~mailhub.directory.users`,
:mod:`~mailhub.directory.ldap`) answer "who is this and is the password right".
"""
