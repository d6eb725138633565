"""The manual keeps up with the code: every configuration key is documented."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest

from mailhub.config import SECTIONS

DOC = Path(__file__).resolve().parent.parent / "doc"


def section_text(name: str) -> str:
    text = (DOC / "configuration.rst").read_text()
    match = re.search(r"^\[%s\]\n~+\n(.*?)(?=^\[\w+\]\n~+\n|\Z)" % re.escape(name), text,
                      re.S | re.M)
    assert match, "doc/configuration.rst has no [%s] section" % name
    return match.group(1)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_key_is_documented_in_its_section(section: str) -> None:
    text = section_text(section)
    documented = set(re.findall(r"``(\w+)``", text))
    keys = {field.name for field in attrs.fields(SECTIONS[section])}
    assert keys - documented == set(), "undocumented keys of [%s]" % section


def test_every_page_of_the_toctree_exists() -> None:
    index = (DOC / "index.rst").read_text()
    pages = re.findall(r"^   (\w+)$", index, re.M)
    assert pages
    for page in pages:
        assert (DOC / (page + ".rst")).exists(), page


def test_the_manual_builds_without_warnings(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html",
                           str(DOC), str(tmp_path / "html")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
