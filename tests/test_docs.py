"""Every code example in ``docs/*.md`` runs.

Each page runs in its own Python process, in a fresh working directory and a fresh ``ASTRA_HOME`` (so the
embedded SQLite database is new), as a reader following the page would run it:

* ```` ```python ```` blocks run in order, in one namespace per page (a later block may use what an earlier
  one defined), as the ``__main__`` module;
* ```` ```sql ```` blocks run on the page's astra database (after the Python blocks above them);
* in ```` ```console ```` blocks, the commands ``$ astra ...`` run (other commands are only shown);
* a ```` ```text ```` block preceded by ``<!-- expected-output -->`` must equal what the Python block just
  before it printed.

A block preceded by the line ``<!-- skip-test -->`` is not run. Use it only for examples that need a server
or a running Airflow deployment. The Sphinx build itself (``-W``) is part of ``scripts/test.sh``.

Run one page by hand with ``python tests/test_docs.py docs/tasks.md`` (it uses the current directory and
``ASTRA_HOME``).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SKIP = "<!-- skip-test -->"
EXPECTED_OUTPUT = "<!-- expected-output -->"
RUNNABLE = ("python", "sql", "console")
_FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    marker: str | None  # SKIP, EXPECTED_OUTPUT or None

    @property
    def where(self) -> str:
        path = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        return f"{path}:{self.line}"


def extract_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a MyST page, including those nested in directives (``{note}`` ...)."""
    lines = path.read_text().splitlines()
    blocks = []
    directives: list[str] = []  # fences of the directives we are inside
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, info = match["fence"], match["info"].strip()
        if info.startswith("{"):  # a directive: its body may hold code blocks
            directives.append(fence)
            i += 1
            continue
        if not info and directives and fence[0] == directives[-1][0] and len(fence) >= len(directives[-1]):
            directives.pop()  # the end of that directive
            i += 1
            continue
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = i + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        previous = i - 1
        while previous >= 0 and not lines[previous].strip():
            previous -= 1
        marker = lines[previous].strip() if previous >= 0 else ""
        blocks.append(
            Block(
                path=path,
                line=i + 1,
                language=info.split()[0] if info else "",
                code="\n".join(lines[i + 1 : end]),
                marker=marker if marker in (SKIP, EXPECTED_OUTPUT) else None,
            )
        )
        i = end + 1
    return blocks


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


# The runner (in the page's own process) ---------------------------------------------------------------


def run_page(path: Path) -> int:
    """Run the examples of one page in this process; print where a block fails and return 1."""
    from sqlalchemy import text

    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = module
    last_output: str | None = None
    for block in extract_blocks(path):
        if block.marker == SKIP:
            continue
        try:
            if block.language == "python":
                captured = io.StringIO()
                try:
                    with contextlib.redirect_stdout(captured):
                        exec(compile(block.code, block.where, "exec"), module.__dict__)
                finally:
                    last_output = captured.getvalue()
                    sys.stdout.write(last_output)
            elif block.language == "sql":
                from astra_provider.database import session_scope

                for statement in filter(str.strip, block.code.split(";")):
                    with session_scope() as session:
                        result = session.execute(text(statement))
                        rows = result.all() if result.returns_rows else []
                    print(f"{block.where}: {len(rows)} row(s)")
            elif block.language == "console":
                for line in block.code.splitlines():
                    if line.startswith("$ astra "):
                        arguments = shlex.split(line[len("$ astra ") :])
                        command = [sys.executable, "-m", "astra_provider.cli", *arguments]
                        result = subprocess.run(command, capture_output=True, text=True)
                        if result.returncode != 0:
                            raise RuntimeError(f"`{line[2:]}` exited {result.returncode}:\n{result.stderr}")
            elif block.language == "text" and block.marker == EXPECTED_OUTPUT:
                _check_output(last_output, block.code)
        except BaseException:
            print(f"\n{block.where}: this {block.language} block failed", file=sys.stderr)
            traceback.print_exc()
            return 1
        if block.language != "python":
            last_output = None
    return 0


def _check_output(printed: str | None, shown: str) -> None:
    if printed is None or printed.strip() != shown.strip():
        raise AssertionError(f"the block above printed:\n{printed}\nbut the page shows:\n{shown}")


if __name__ == "__main__":
    sys.exit(run_page(Path(sys.argv[1]).resolve()))


# The tests ---------------------------------------------------------------------------------------------


def pages_with_examples() -> list[Path]:
    return [path for path in pages() if any(b.language in RUNNABLE for b in extract_blocks(path))]


@pytest.mark.parametrize("path", pages_with_examples(), ids=lambda path: path.name)
def test_examples_run(path: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "ASTRA_DATABASE_URL"}
    env.update(ASTRA_HOME=str(tmp_path / "astra-home"), MPLBACKEND="Agg")
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(path)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{path.name}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def test_markers_are_placed_on_code_blocks() -> None:
    """A marker must sit right above the block it is about (else it silently applies to nothing)."""
    for path in pages():
        lines = path.read_text().splitlines()
        marked = {b.line for b in extract_blocks(path) if b.marker}
        for number, line in enumerate(lines, 1):
            if line.strip() in (SKIP, EXPECTED_OUTPUT):
                following = next((n for n in range(number + 1, len(lines) + 1) if lines[n - 1].strip()), None)
                assert following in marked, f"{path.name}:{number}: {line.strip()} is not above a code block"
    expected = [b for p in pages() for b in extract_blocks(p) if b.marker == EXPECTED_OUTPUT]
    assert all(b.language == "text" for b in expected), "expected-output marks ```text blocks"


def test_extraction(tmp_path: Path) -> None:
    sample = tmp_path / "sample.md"
    sample.write_text(
        "# t\n\n<!-- skip-test -->\n```python\nraise SystemExit\n```\n\n````{note}\n```python\nx = 1\n```\n"
        "````\n\n```bash\n```python\n```\n"
    )
    blocks = extract_blocks(sample)
    assert [(b.line, b.language, b.marker) for b in blocks] == [(4, "python", SKIP), (9, "python", None),
                                                                 (14, "bash", None)]  # fmt: skip
