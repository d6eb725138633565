"""The manual's console examples work verbatim, page after page, as a newcomer runs them.

One fresh folder, one ``twistd -n mailhub`` started there on the embedded
defaults (the reader starts it as doc/installation.rst says; the test starts
it itself, on a free port), and every page's ``$`` examples run in the
order of the manual's table of contents, each page in its own shell. What
changes from the pages: the port (the examples use 8080) and
``/etc/mailhub/mailhub.ini`` (the production path; here ``mailhub.ini`` in
the folder). The server's ``mailhub.ini`` holds the push credentials
doc/push.rst uses (``dovecot`` / ``CHANGE-ME``). Run-to-run values are
masked (see tests/support/doc_examples.py, which also describes the
``.. skip-example:`` mark).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from tests.support.doc_examples import examples, masked, matches, run_examples, skipped
from tests.support.process import Mailhub
from tests.support.require import free_port

DOC = Path(__file__).resolve().parent.parent / "doc"

CONFIG = """\
[push]
username = dovecot
password = CHANGE-ME
"""

#: At most this many examples may be marked as not runnable here: 9 that
#: need LDAP users, a foreign declaration or a calendar file, and the 7 of
#: ``mailhub dead`` (cli.rst), which need dead letters that only a failing
#: collector makes.
MAX_SKIPPED = 16


def toctree() -> list[str]:
    return re.findall(r"^   ([\w-]+)$", (DOC / "index.rst").read_text(), re.M)


def pages_with_examples() -> list[Path]:
    """The pages of the manual that have ``$`` examples, in the manual's order."""
    return [DOC / (name + ".rst") for name in toctree()
            if examples(DOC / (name + ".rst"))]


def test_every_example_of_the_manual_in_order(tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    replace = {"127.0.0.1:8080": "127.0.0.1:%d" % port,
               "/etc/mailhub/mailhub.ini": "mailhub.ini"}
    wrong = []
    ran = 0
    with Mailhub(tmp_path, CONFIG, port=port):
        for page in pages_with_examples():
            for example, printed in run_examples(page, tmp_path, env, replace):
                ran += 1
                expected = masked(example.output, tmp_path)
                got = masked(printed, tmp_path)
                if not matches(expected, got):
                    wrong.append("doc/%s line %d: %s\n--- the page shows:\n%s\n--- it printed:\n%s"
                                 % (page.name, example.line, example.command, expected, got))
    assert not wrong, "\n\n".join(wrong)
    assert ran >= 50, ran


def test_the_pages_a_newcomer_follows_have_examples_that_run() -> None:
    names = [p.stem for p in pages_with_examples()]
    for page in ("installation", "cli", "hooks", "push"):
        assert page in names, names
        assert any(e.skipped is None for e in examples(DOC / (page + ".rst"))), page


def test_examples_marked_as_not_runnable_are_few_and_say_why() -> None:
    marked = [(page.name, e) for page in pages_with_examples() for e in skipped(page)]
    assert len(marked) <= MAX_SKIPPED, [(name, e.line, e.skipped) for name, e in marked]
    for name, example in marked:
        assert len(example.skipped or "") > 10, (name, example.line)
