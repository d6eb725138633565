"""The manual's console examples work verbatim against ``twistd -n mailhub``.

Only the port is changed (the examples use 8080; the test takes a free one),
and profile ids, which differ on every run, are masked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


from tests.support.doc_examples import masked, run_examples
from tests.support.process import Mailhub
from tests.support.require import free_port

DOC = Path(__file__).resolve().parent.parent / "doc"


def test_hook_examples(tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    with Mailhub(tmp_path, port=port):
        results = run_examples(DOC / "hooks.rst", tmp_path, env,
                               {"127.0.0.1:8080": "127.0.0.1:%d" % port})
    assert len(results) >= 12
    for example, printed in results:
        assert masked(printed) == masked(example.output), (
            "doc/hooks.rst line %d: %s" % (example.line, example.command))
