"""The README's worked export example runs verbatim: its shell commands (two pt2 exports) in a new
folder, then its Python block in a new process without sed_fast on its path (the loader the export
wrote beside the models, torch alone). Two AOTInductor compiles: minutes on 2 shared cores, so
marked slow (run with --run-slow)."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _example():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("One export, two vocabularies"):]
    shell = re.search(r"Python in the export's folder:\n\n(?:<!--[^\n]*-->\n)?```bash\n(.*?)```", section,
                      re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    commands = " ".join(line.strip() for line in shell.splitlines()).replace(" \\ ", " ").split("sed-fast ")[1:]
    return [shlex.split(command) for command in commands], python


def test_the_readme_example_is_found():
    commands, python = _example()
    assert [command[0] for command in commands] == ["export", "export"]
    assert "sed_exported.load" in python and "text_tokens" in python


@pytest.mark.slow
def test_the_readme_export_example_runs_verbatim(tmp_path):
    from sed_fast import cli

    commands, python = _example()
    kept = os.getcwd()
    os.chdir(tmp_path)
    try:
        for command in commands:
            assert cli.main(command) == 0, command
    finally:
        os.chdir(kept)
    (tmp_path / "example.py").write_text(python)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("3 classes: torch.Size([96, 128])") and lines[1].startswith("5 classes:")
