"""Run the console examples of a manual page and compare what they print.

A page's examples are the ``$ command`` lines of its indented blocks (with
``\\`` continuation lines), each followed by the output it prints. They run in
one bash session, in order, so variables set by one (``TOKEN=...``) serve the
next. Values that differ from run to run (profile ids) are masked before
comparing.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import attrs

PROFILE_ID = re.compile(r"\b[0-9A-Za-z]{22}\b")


@attrs.frozen
class Example:
    command: str
    output: str
    line: int


def examples(page: Path) -> list[Example]:
    """Every ``$ command`` of a page with the output written under it."""
    found: list[Example] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if not stripped.startswith("$ "):
            i += 1
            continue
        start = i
        command = [stripped[2:]]
        while command[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            command.append(lines[i].strip())
        output = []
        i += 1
        while i < len(lines) and lines[i].strip() and not lines[i].strip().startswith("$ ") \
                and lines[i].startswith("    "):
            output.append(lines[i].strip())
            i += 1
        found.append(Example("\n".join(command), "\n".join(output), start + 1))
    return found


def run_examples(page: Path, cwd: Path, env: dict[str, str],
                 replace: dict[str, str]) -> list[tuple[Example, str]]:
    """Run every example in one shell; (example, what it printed) for each."""
    marker = "__MAILHUB_EXAMPLE_DONE__"
    script = []
    items = examples(page)
    for example in items:
        command = example.command
        for old, new in replace.items():
            command = command.replace(old, new)
        script.append(command)
        script.append("echo %s" % marker)
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    printed = done.stdout.split(marker + "\n")
    return list(zip(items, [p.strip() for p in printed]))


def masked(text: str) -> str:
    return PROFILE_ID.sub("<id>", text)
