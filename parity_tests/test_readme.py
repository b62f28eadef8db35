"""The README is the landing page: its Python snippets run as written, each in a fresh interpreter that
imports this checkout's packages; it keeps the two commands at its top, stays short, and its links and
images point at files that exist."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
COMMANDS = ['pip install -e ".[jax,examples]" && python examples/flax_train.py',
            'pip install -e ".[test]" && python -m pytest']


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=lambda i: f"snippet{i}")
def test_readme_snippet_runs(index, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", SNIPPETS[index]], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"snippet {index} failed:\n{SNIPPETS[index]}\n{result.stderr[-3000:]}"


def test_readme_starts_with_the_two_commands():
    first = re.search(r"```bash\n(.*?)```", TEXT, flags=re.S)
    assert first and first.group(1).strip().split("\n") == COMMANDS
    assert TEXT.index(first.group(0)) < TEXT.index("\n## ")  # above the first section


def test_readme_is_a_landing_page():
    assert len(TEXT.splitlines()) <= 150
    assert 'pip install -e ".[docs]" && mkdocs serve' in TEXT


def test_readme_links_and_images_exist():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", TEXT)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert "examples/figures/focal_curve.png" in local and any(t.startswith("docs/screenshots/") for t in local)
    for target in local:
        assert (ROOT / target).exists(), f"README links to a missing file: {target}"
