"""Run the console examples of the manual's pages and compare what they print.

A page's examples are the ``$ command`` lines of its indented blocks (with
``\\`` continuation lines), each followed by the output it prints. The
examples of one page run in one bash session, in order, so variables set by
one (``TOKEN=...``) serve the next; the pages run one after the other in one
folder, against one server, as a newcomer following the manual would.

Conventions the pages follow:

- ``$ cat FILE`` shows a file the reader writes: the runner writes the
  output shown under it to ``FILE`` first (when the page has not made it).
- ``...`` in an expected output stands for any text: alone on a line, for
  any lines; inside a line, for the rest of that line's varying part.
- A reST comment ``.. skip-example: REASON`` marks the examples of the next
  indented block as not runnable here (they need something the test cannot
  provide): they are parsed, listed with the reason, and not run. Keep such
  marks few.

Values that differ from run to run are masked before comparing: profile ids
(22 base62 characters), tokens (32), ISO 8601 times, schema version numbers
(migrations are added over time) and the folder the examples run in (shown
as ``/tmp/docrun`` in the pages).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import attrs

PROFILE_ID = re.compile(r"\b[0-9A-Za-z]{22}\b")
TOKEN = re.compile(r"\b[0-9A-Za-z]{32}\b")
TIME = re.compile(r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?")
SCHEMA = re.compile(r"schema version \d+ of \d+")
#: The line every ``mailhub`` command run without ``--config`` writes on
#: stderr first (doc/cli.rst shows it once; installation.rst says the
#: examples leave it out).
CONFIG_NOTE = re.compile(r"^mailhub: configuration: .*\n?", re.M)
#: The folder the pages' outputs show for the reader's working folder.
FOLDER = "/tmp/docrun"
SKIP = re.compile(r"^\.\. skip-example:\s*(.+)$")


@attrs.frozen
class Example:
    command: str
    output: str
    line: int
    #: Why it is not run here, or None.
    skipped: str | None = None


def examples(page: Path) -> list[Example]:
    """Every ``$ command`` of a page with the output written under it."""
    found: list[Example] = []
    lines = page.read_text().splitlines()
    skip: str | None = None
    skip_armed = False  # the mark's block has started
    i = 0
    while i < len(lines):
        raw = lines[i]
        stripped = raw.strip()
        mark = SKIP.match(stripped)
        if mark:
            skip, skip_armed = mark.group(1), False
            i += 1
            continue
        if skip is not None and skip_armed and raw and not raw[0].isspace():
            skip = None  # the marked block is over
        if not stripped.startswith("$ "):
            i += 1
            continue
        skip_armed = skip is not None
        start = i
        command = [stripped[2:]]
        while command[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            command.append(lines[i].strip())
        output = []
        indent = raw[:len(raw) - len(raw.lstrip())]
        i += 1
        while i < len(lines) and lines[i].strip() and not lines[i].strip().startswith("$ ") \
                and lines[i].startswith(indent):
            output.append(lines[i].strip())
            i += 1
        found.append(Example("\n".join(command), "\n".join(output), start + 1, skip))
    return found


def _cat_file(command: str) -> str | None:
    match = re.fullmatch(r"cat ([\w.\-/]+)", command)
    return match.group(1) if match else None


def run_examples(page: Path, cwd: Path, env: dict[str, str],
                 replace: dict[str, str], timeout: float = 300) -> list[tuple[Example, str]]:
    """Run a page's examples (but the skipped) in one shell; (example, what it printed)."""
    marker = "__MAILHUB_EXAMPLE_DONE__"
    script = []
    items = [e for e in examples(page) if e.skipped is None]
    for example in items:
        command = example.command
        for old, new in replace.items():
            command = command.replace(old, new)
        shown = _cat_file(command)
        if shown is not None and not (cwd / shown).exists():
            (cwd / shown).write_text(example.output + "\n")
        script.append(command)
        # The marker must not change $?: an ``echo $?`` example reads the command's.
        script.append("__status=$?; echo %s; (exit $__status)" % marker)
    # Errors are shown in the pages where the reader sees them: in the terminal.
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    printed = done.stdout.split(marker + "\n")
    return list(zip(items, [p.strip() for p in printed]))


def masked(text: str, folder: Path | None = None) -> str:
    """``text`` with what varies from run to run replaced by fixed words, and
    without the configuration note of commands run without ``--config``."""
    text = CONFIG_NOTE.sub("", text)
    if folder is not None:
        text = text.replace(str(folder), FOLDER)
    text = TIME.sub("<time>", text)
    text = SCHEMA.sub("schema version <n> of <n>", text)
    text = TOKEN.sub("<token>", text)
    return PROFILE_ID.sub("<id>", text)


def matches(expected: str, printed: str) -> bool:
    """Whether ``printed`` is what ``expected`` shows, ``...`` standing for any text.

    Trailing blanks of each line are ignored (column output pads them).
    """
    expected = "\n".join(line.rstrip() for line in expected.splitlines())
    printed = "\n".join(line.rstrip() for line in printed.splitlines())
    if "..." not in expected:
        return expected == printed
    pattern = "".join(".*?" if piece == "..." else re.escape(piece)
                      for piece in re.split(r"(\.\.\.)", expected))
    return re.fullmatch(pattern, printed, re.S) is not None


def skipped(page: Path) -> list[Example]:
    """The examples of ``page`` marked as not runnable here."""
    return [e for e in examples(page) if e.skipped is not None]
