"""The README and the docs pages are executed, so what they show cannot drift from what the package does.

- Every ```python block runs on its own, as a reader who pastes it alone into a fresh interpreter would run it: a new
  namespace and a new temporary working directory per block, so a block imports what it uses and makes its own data.
  Each block is one test, named by page and line (``pytest tests/test_docs.py -k faq.md`` runs one page's blocks).
  A block right after ``<!-- skip-test -->`` is not run (kept for the few that need what the suite does not have).
- A ```text block right after ``<!-- output -->`` must equal what the python block before it printed.
- A ```console block starting ``$ lit-decay ...`` must equal what that command prints (run in-process).
- The site's navigation lists every page, links between files resolve, the API page covers every public name.

The strict docs build itself (``mkdocs build --strict``) runs in scripts/test.sh, not here.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import lit_decay
from lit_decay import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
SKIP_MARKER = "<!-- skip-test -->"
OUTPUT_MARKER = "<!-- output -->"
# The few blocks allowed to skip, all pages together; the README's usage example is never one of them.
MAX_SKIPPED = 3

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)")


@dataclass(frozen=True)
class Block:
    """One fenced block of a markdown page."""

    language: str
    code: str
    line: int  # 1-based line of the opening fence
    marker: str  # the HTML comment on the line before the fence ('' if none)


def parse_blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text`` in order, their content dedented by the fence's own indentation."""
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        previous = next((lines[i].strip() for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marker = previous if previous.startswith("<!--") else ""
        body: list[str] = []
        end = index + 1
        while end < len(lines):
            closing = lines[end].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            body.append(lines[end][len(indent) :] if lines[end].startswith(indent) else lines[end].lstrip())
            end += 1
        else:
            raise ValueError(f"unclosed code fence at line {index + 1}")
        blocks.append(Block(opening["info"].lower(), "\n".join(body) + "\n", index + 1, marker))
        index = end + 1
    return blocks


def blocks_of(page: Path) -> list[Block]:
    return parse_blocks(page.read_text(encoding="utf-8"))


def _normalized(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


@dataclass(frozen=True)
class Case:
    """One python block to run, and the output the page shows for it (None when it shows none)."""

    where: str  # page:line, the test's id
    block: Block
    expected: str | None


def python_cases(pages: list[Path] = PAGES) -> list[Case]:
    cases = []
    for page in pages:
        blocks = blocks_of(page)
        for block, after in zip(blocks, [*blocks[1:], None]):
            if block.language != "python" or block.marker == SKIP_MARKER:
                continue
            expected = after.code if after is not None and after.marker == OUTPUT_MARKER else None
            label = page.relative_to(ROOT).as_posix() if page.is_relative_to(ROOT) else page.name
            cases.append(Case(f"{label}:{block.line}", block, expected))
    return cases


def run_block(case: Case) -> str:
    """Run one block in a namespace of its own; what it printed. The caller picks the working directory."""
    namespace: dict[str, object] = {"__name__": "__docs__"}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(case.block.code, case.where, "exec"), namespace)
    return stdout.getvalue()


def test_parse_blocks_reads_markers_indentation_and_languages() -> None:
    text = (
        "Intro\n\n<!-- skip-test -->\n```python\nprint(1)\n```\n\n!!! note\n    ```python\n    x = 1\n"
        "    if x:\n        print(x)\n    ```\n<!-- output -->\n```text\n1\n```\n````markdown\n```python\n````\n"
    )
    blocks = parse_blocks(text)
    assert [(b.language, b.line, b.marker) for b in blocks] == [
        ("python", 4, SKIP_MARKER),
        ("python", 9, ""),
        ("text", 15, OUTPUT_MARKER),
        ("markdown", 18, ""),
    ]
    assert blocks[1].code == "x = 1\nif x:\n    print(x)\n"
    assert blocks[3].code == "```python\n"


@pytest.mark.parametrize("case", python_cases(), ids=lambda case: case.where)
def test_python_block_runs_on_its_own_and_prints_what_the_page_shows(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    printed = run_block(case)
    if case.expected is not None:
        assert _normalized(printed) == _normalized(case.expected), f"{case.where}: the page shows other output"


def test_blocks_run_apart_so_a_name_from_an_earlier_block_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\nprint(x)\n```\n<!-- output -->\n```text\n1\n```\n\n```python\nprint(x)\n```\n")
    first, second = python_cases([page])
    monkeypatch.chdir(tmp_path)
    assert (first.expected, second.expected) == ("1\n", None)
    assert run_block(first) == "1\n"
    with pytest.raises(NameError, match="'x' is not defined"):
        run_block(second)


def _console_commands() -> list[tuple[str, Block]]:
    found = []
    for page in PAGES:
        for block in blocks_of(page):
            if block.language == "console" and block.code.startswith("$ lit-decay "):
                found.append((f"{page.relative_to(ROOT)}:{block.line}", block))
    return found


@pytest.mark.parametrize(("where", "block"), _console_commands(), ids=lambda value: str(value)[:40])
def test_console_output_is_what_the_cli_prints(
    where: str, block: Block, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    command, _, shown = block.code.partition("\n")
    monkeypatch.chdir(ROOT)  # so `examples.models:...` imports as it does for a user in the repository root
    assert cli.main(shlex.split(command)[2:]) == 0
    assert _normalized(capsys.readouterr().out) == _normalized(shown), f"{where}: the page shows other output"


def test_the_lit_decay_inspect_example_is_checked() -> None:
    assert any("examples.models:TinyGPT" in block.code for _, block in _console_commands())


def test_markers_are_used_where_they_mean_something() -> None:
    skipped = []
    for page in PAGES:
        blocks = blocks_of(page)
        for before, block in zip([None, *blocks], blocks):
            where = f"{page.relative_to(ROOT)}:{block.line}"
            if block.marker == SKIP_MARKER:
                assert block.language == "python", f"{where}: only python blocks are run, so only they can skip"
                skipped.append(where)
            if block.marker == OUTPUT_MARKER:
                assert block.language == "text", f"{where}: expected output goes in a ```text block"
                assert before is not None and before.language == "python", f"{where}: no python block before"
                assert before.marker != SKIP_MARKER, f"{where}: an output block must follow a python block that is run"
    assert len(skipped) <= MAX_SKIPPED, f"too many skipped blocks: {skipped}"
    assert not [where for where in skipped if where.startswith("README")]


def test_readme_has_the_two_commands_and_a_usage_example_that_runs() -> None:
    blocks = blocks_of(README)
    commands = [line.strip() for b in blocks if b.language == "bash" for line in b.code.splitlines()]
    assert "bash scripts/demo.sh" in commands
    assert "bash scripts/test.sh" in commands
    assert (ROOT / "scripts" / "demo.sh").is_file() and (ROOT / "scripts" / "test.sh").is_file()
    usage = [b for b in blocks if b.language == "python"]
    assert usage and all(b.marker != SKIP_MARKER for b in usage)
    code = "".join(b.code for b in usage)
    for step in ("configure_adam(", "WeightDecayMonitor(", "TensorBoardLogger(", "tensorboard --logdir"):
        assert step in code


_LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    # Links inside code blocks are code, not links.
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    for match in _LINK.finditer(prose):
        target = match["target"].split("#")[0]
        if not target or re.match(r"^[a-z]+:", target):
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def _nav_files(entries: object) -> list[str]:
    if isinstance(entries, str):
        return [entries]
    if isinstance(entries, list):
        return [f for entry in entries for f in _nav_files(entry)]
    if isinstance(entries, dict):
        return [f for value in entries.values() for f in _nav_files(value)]
    return []


# Pages that must be in the site's navigation; pages added later join the nav (and this list) with their author.
NAV_PAGES = {
    "index.md",
    "quickstart.md",
    "lightning_cli.md",
    "modes.md",
    "modes_comparison.md",
    "grouping.md",
    "monitoring.md",
    "choosing_weight_decay.md",
    "schedules.md",
    "performance.md",
    "api.md",
    "faq.md",
}


def test_navigation_lists_the_pages_and_only_existing_ones() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = _nav_files(config["nav"])
    assert len(listed) == len(set(listed))
    assert set(listed) <= {page.name for page in DOCS.glob("*.md")}
    assert set(listed) >= NAV_PAGES
    assert listed[0] == "index.md"
    assert config["theme"]["font"] is False  # no web fonts fetched at view time


def test_api_page_documents_every_public_name() -> None:
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: (lit_decay[\w.]*)", text, flags=re.M))
    assert {f"lit_decay.{name}" for name in lit_decay.__all__} <= documented


def test_dashboard_picture_is_a_real_screenshot() -> None:
    data = (DOCS / "img" / "dashboard.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 500
    # A blank or "no data" page compresses to a few kilobytes; charts with lines and labels do not.
    assert len(data) > 40_000
