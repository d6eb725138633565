"""The LDAP fast path reaches inside ldap3: it holds only for the ldap3 it was checked with.

mailhub.directory.ldap_wire uses ldap3 internals (see its docstring). These
tests fail as soon as the installed ldap3, or the one pyproject.toml asks
for, is not the version the package names: an ldap3 upgrade must be a
deliberate change that re-runs tests/directory/test_ldap_wire.py.
"""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import ldap3
from ldap3.strategy.sync import SyncStrategy

from mailhub.directory.ldap_wire import FAST_REQUESTS, LDAP3_VERSION

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_pins_exactly_the_ldap3_the_fast_path_was_written_for() -> None:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pins = [d for d in dependencies if re.match(r"ldap3\b", d)]
    assert pins == ["ldap3==%s" % LDAP3_VERSION]


def test_the_installed_ldap3_is_the_pinned_one() -> None:
    assert version("ldap3") == LDAP3_VERSION
    assert ldap3.__version__ == LDAP3_VERSION


def test_the_internals_it_uses_are_there_and_the_fast_path_is_on() -> None:
    for name in ("post_send_search", "post_send_single_response", "get_response"):
        assert hasattr(SyncStrategy, name), name
    assert FAST_REQUESTS
