"""Every fenced code block of README.md is run here, or marked in the README with why it is not.

A block is run as it is written, in a fresh folder that holds the files the README's examples name
(:data:`INPUT_FILES`): ``python`` blocks with this Python, ``bash``/``sh`` blocks with
``bash -eo pipefail`` (``sed-fast`` on the PATH, this tree first on ``PYTHONPATH``). HTML comments on
the lines right above a block change that; they do not show on a rendered README:

``<!-- not run: REASON -->``
    the block is not run here; REASON says why (a GPU, the released checkpoint, a data set...).
``<!-- ci:install -->``, ``<!-- ci:test -->``
    the set-up commands, run by ``.ci/run`` in a fresh virtual environment (not inside the suite).
``<!-- run only lines 2,4: REASON -->``
    only those lines of the block are run (1-based); REASON says why the others are not.
``<!-- test replaces: OLD => NEW -->``
    the test runs the block with OLD replaced by NEW (small settings: a tiny resolution, random
    weights); OLD must occur in the block, so a marker cannot go stale silently.
``<!-- slow: REASON -->``
    run only with ``--run-slow`` (minutes of CPU or gigabytes of disk).

An unmarked block is run: a new block fails until it runs here or is marked with its reason.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RUNNERS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
#: Seconds one block may take before it counts as failed (mark slower ones slow, or not run).
BLOCK_TIMEOUT_S = 900

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
_MARKER = re.compile(r"^\s*<!--\s*(?P<body>.*?)\s*-->\s*$")


@dataclass
class Block:
    line: int                    # 1-based line of the opening fence
    heading: str                 # the section it is in
    lang: str
    code: str
    markers: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-") or "top"
        return f"L{self.line}-{slug}-{self.lang or 'plain'}"

    def marker(self, prefix: str) -> List[str]:
        return [m[len(prefix):].strip() for m in self.markers if m.startswith(prefix)]


def readme_blocks(text: str) -> List[Block]:
    """The fenced blocks of ``text``, each with the HTML comments on the lines right above it."""
    lines = text.splitlines()
    blocks: List[Block] = []
    heading = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        opening = _FENCE.match(line)
        if not opening:
            i += 1
            continue
        fence, indent = opening.group("fence"), len(opening.group("indent"))
        body: List[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][indent:] if lines[j][:indent].isspace() else lines[j])
            j += 1
        markers: List[str] = []
        k = i - 1
        while k >= 0 and _MARKER.match(lines[k]):
            markers.insert(0, _MARKER.match(lines[k]).group("body"))
            k -= 1
        blocks.append(Block(i + 1, heading, opening.group("lang").lower(), "\n".join(body) + "\n", markers))
        i = j + 1
    return blocks


def indented_code_blocks(text: str) -> List[int]:
    """Lines that open an indented (4-space) code block outside any list or fence: fence those, so
    that they carry a language and markers like the others."""
    lines = text.splitlines()
    found, inside_fence = [], False
    for i, line in enumerate(lines):
        if _FENCE.match(line):
            inside_fence = not inside_fence
            continue
        if inside_fence or not line.startswith("    ") or not line.strip() or i == 0 or lines[i - 1].strip():
            continue
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        previous = lines[k] if k >= 0 else ""
        if not re.match(r"^(\s{2,}|\s*[-*+] |\s*\d+[.)] )", previous):  # not a list item's continuation
            found.append(i + 1)
    return found


def plan(block: Block) -> Tuple[str, Optional[str]]:
    """("run" | "slow" | "skip", why): what this test does with ``block``; raises AssertionError for
    a block that is neither runnable nor marked, or a malformed marker."""
    if block.marker("not run:"):
        reason = block.marker("not run:")[0]
        assert len(reason) >= 10, f"README.md line {block.line}: say why the block is not run ({reason!r})"
        return "skip", reason
    ci = [m for m in block.markers if m.startswith("ci:")]
    if ci:
        assert ci[0] in ("ci:install", "ci:test"), f"README.md line {block.line}: unknown CI marker {ci[0]!r}"
        return "skip", f"run by .ci/run ({ci[0]})"
    assert block.lang in RUNNERS, (
        f"README.md line {block.line} ({block.heading}): a ```{block.lang or ''} block that this test cannot "
        f"run; mark it with <!-- not run: REASON --> on the line above (or make it a {'/'.join(RUNNERS)} block)")
    slow = block.marker("slow:")
    return ("slow", slow[0]) if slow else ("run", None)


def runnable_code(block: Block) -> str:
    """The block's code as this test runs it: only the lines named, the replacements made."""
    code = block.code
    only = block.marker("run only lines")
    if only:
        numbers, _, reason = only[0].partition(":")
        assert reason.strip(), f"README.md line {block.line}: say why the other lines are not run"
        wanted = {int(n) for n in re.split(r"[,\s]+", numbers.strip()) if n}
        lines = code.splitlines()
        assert wanted and max(wanted) <= len(lines), f"README.md line {block.line}: lines {sorted(wanted)}?"
        code = "\n".join(line for n, line in enumerate(lines, 1) if n in wanted) + "\n"
    for replacement in block.marker("test replaces:"):
        old, arrow, new = replacement.partition(" => ")
        assert arrow, f"README.md line {block.line}: write <!-- test replaces: OLD => NEW -->"
        assert old in code, f"README.md line {block.line}: {old!r} (a test replacement) is not in the block"
        code = code.replace(old, new)
    return code


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_the_parser_finds_blocks_and_their_markers():
    text = ("# A\n\n```python\nprint(1)\n```\n\n## B\n<!-- not run: needs a GPU, none here -->\n"
            "<!-- test replaces: x => y -->\n```bash\necho x\n```\n  ```\nplain\n  ```\n")
    first, second, third = readme_blocks(text)
    assert (first.line, first.heading, first.lang, first.code, first.markers) == (3, "A", "python", "print(1)\n", [])
    assert second.heading == "B" and second.markers == ["not run: needs a GPU, none here", "test replaces: x => y"]
    assert plan(second) == ("skip", "needs a GPU, none here") and runnable_code(second) == "echo y\n"
    assert third.lang == "" and third.code == "plain\n"
    with pytest.raises(AssertionError, match="cannot run"):
        plan(third)  # an unmarked block of no runnable language fails: mark it or make it runnable
    stale = Block(9, "C", "bash", "echo a\n", ["test replaces: zzz => y"])
    with pytest.raises(AssertionError, match="not in the block"):
        runnable_code(stale)
    only = Block(9, "C", "bash", "one\ntwo\nthree\n", ["run only lines 1,3: two needs a GPU"])
    assert runnable_code(only) == "one\nthree\n"


def test_every_block_is_run_or_marked_with_a_reason():
    assert len(BLOCKS) >= 5, "README.md's code blocks were not found"
    problems = []
    for block in BLOCKS:
        try:
            plan(block)
            runnable_code(block)
        except AssertionError as error:
            problems.append(str(error))
    assert not problems, "\n".join(problems)


def test_no_indented_code_blocks():
    lines = indented_code_blocks(README.read_text(encoding="utf-8"))
    assert not lines, (f"README.md lines {lines} open indented code blocks: fence them (```bash ... ```) and run "
                       "or mark them like the other blocks")
    assert indented_code_blocks("Text:\n\n    sed-fast doctor\n\n- item\n\n    continued\n") == [3]


def test_ci_blocks_are_the_ones_ci_reads():
    marked = {m for block in BLOCKS for m in block.markers if m.startswith("ci:")}
    assert marked == {"ci:install", "ci:test"}
    assert "<!-- ci:$1 -->" in (REPO / ".ci" / "run").read_text()


@pytest.fixture(scope="module")
def input_files(tmp_path_factory) -> Dict[str, bytes]:
    """The files the README's examples name, made small: photo.jpg, img.png (the sample scene), clip.mp4."""
    from sed_fast.data.sample_scene import draw_sample_scene

    folder = tmp_path_factory.mktemp("readme_inputs")
    scene = draw_sample_scene()
    scene.save(folder / "photo.jpg", quality=90)
    scene.resize((160, 120)).save(folder / "img.png")
    sys.path.insert(0, str(Path(__file__).resolve().parent / "video"))
    try:
        from video_clips import write_clip

        write_clip(folder / "clip.mp4", frames=4)
    except ImportError:  # PyAV absent: the video block says so when it runs
        pass
    return {path.name: path.read_bytes() for path in folder.iterdir()}


#: What the folder a block runs in holds (the names the README's examples use).
INPUT_FILES = ("photo.jpg", "img.png", "clip.mp4")


def _cases():
    for block in BLOCKS:
        try:
            kind, why = plan(block)
        except AssertionError:
            continue  # reported by test_every_block_is_run_or_marked_with_a_reason
        marks = [pytest.mark.slow] if kind == "slow" else []
        if kind == "skip":
            marks.append(pytest.mark.skip(reason=f"README.md line {block.line}: {why}"))
        yield pytest.param(block, id=block.name, marks=marks)


@pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")
@pytest.mark.parametrize("block", list(_cases()))
def test_readme_block_runs(block: Block, tmp_path, input_files):
    for name, data in input_files.items():
        (tmp_path / name).write_bytes(data)
    runner = RUNNERS[block.lang]
    script = tmp_path / ("readme_block.py" if runner == "python" else "readme_block.sh")
    script.write_text(runnable_code(block))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env.setdefault("MPLBACKEND", "Agg")
    command = [sys.executable, script.name] if runner == "python" else ["bash", "-eo", "pipefail", script.name]
    try:
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md line {block.line} ran over {BLOCK_TIMEOUT_S} s: make it cheaper with a "
                    "<!-- test replaces: OLD => NEW --> marker, or mark it slow or not run, with the reason")
    assert result.returncode == 0, (
        f"README.md line {block.line} ({block.heading}) failed with exit code {result.returncode}:\n"
        f"--- code run ---\n{script.read_text()}--- stdout ---\n{result.stdout[-3000:]}\n"
        f"--- stderr ---\n{result.stderr[-6000:]}")
