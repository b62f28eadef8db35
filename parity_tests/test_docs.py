"""The documentation site is tested like code.

Every fenced ``python`` block on every page under ``docs/`` runs as written, each in a fresh interpreter
that imports this checkout's packages. A block whose first line is the opt-out comment ``SYNTAX_ONLY``
(for code that needs several devices or runs long) is compiled but not run; the comment must give a
reason in parentheses. The API reference documents every public name of the three packages, and each
JAX/PyTorch twin links to the other.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SYNTAX_ONLY = "# docs-test: syntax-only"
FENCE = re.compile(r"^([ \t]*)```python[^\n]*\n(.*?)^\1```", flags=re.S | re.M)


def python_blocks(text: str) -> list[str]:
    """The fenced ``python`` blocks of a Markdown text, dedented (blocks inside admonitions included)."""
    return [textwrap.dedent(body) for _, body in FENCE.findall(text)]


def _collect() -> list[tuple[str, str]]:
    blocks = []
    for page in sorted(DOCS.rglob("*.md")):
        for i, code in enumerate(python_blocks(page.read_text())):
            blocks.append((f"{page.relative_to(DOCS).with_suffix('')}#{i}", code))
    return blocks


BLOCKS = _collect()


def run_block(code: str, cwd: pathlib.Path) -> subprocess.CompletedProcess | None:
    """Compiles ``code``; runs it in a fresh interpreter unless it opts out. None when it only compiled."""
    compile(code, "<docs block>", "exec")  # a SyntaxError fails the test in both modes
    first = code.lstrip().split("\n", 1)[0]
    if first.startswith(SYNTAX_ONLY):
        assert re.match(re.escape(SYNTAX_ONLY) + r" \(.+\)$", first), f"the opt-out needs a reason: {first!r}"
        return None
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_every_getting_started_page_has_code():
    pages = sorted((DOCS / "getting-started").glob("*.md"))
    assert len(pages) == 3
    for page in pages:
        assert python_blocks(page.read_text()), f"{page.name} has no python block"


@pytest.mark.parametrize("name,code", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_docs_block_runs(name, code, tmp_path):
    result = run_block(code, tmp_path)
    if result is not None:
        assert result.returncode == 0, f"{name} failed:\n{code}\n{result.stderr[-3000:]}"


def test_syntax_only_blocks_are_still_compiled(tmp_path):
    with pytest.raises(SyntaxError):
        run_block(f"{SYNTAX_ONLY} (needs 8 devices)\nimport jax\nx = (", tmp_path)
    assert run_block(f"{SYNTAX_ONLY} (needs 8 devices)\nraise SystemExit(1)", tmp_path) is None
    with pytest.raises(AssertionError, match="needs a reason"):
        run_block(f"{SYNTAX_ONLY}\npass", tmp_path)


def test_python_blocks_are_found_inside_admonitions():
    text = "!!! note\n    ```python\n    x = 1\n    ```\n\n```python\ny = 2\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = 2\n"]


@pytest.mark.parametrize("package", ["focal_jax", "focal_torch", "focal_spec"])
def test_api_reference_documents_every_public_name(package):
    module = __import__(package)
    page = (DOCS / "api" / f"{package}.md").read_text()
    documented = set(re.findall(rf"^::: {package}\.(\w+)$", page, flags=re.M))
    assert documented == set(module.__all__), set(module.__all__) ^ documented


def test_api_twins_link_to_each_other():
    import focal_jax
    import focal_torch

    index = (DOCS / "api" / "index.md").read_text()
    for name in focal_jax.__all__:
        row = re.search(rf"^\| \[`focal_jax\.{name}`\]\[focal_jax\.{name}\] \| (.*)$", index, flags=re.M)
        assert row and f"[focal_torch.{name}]" in row.group(1), f"no twin row for {name}"
        for here, there in (("focal_jax", "focal_torch"), ("focal_torch", "focal_jax")):
            page = (DOCS / "api" / f"{here}.md").read_text()
            section = page.split(f"::: {here}.{name}\n", 1)[1].split("\n::: ", 1)[0]
            assert f"[{there}.{name}]" in section, f"{here}.{name} does not link its twin"
    for name in set(focal_torch.__all__) - set(focal_jax.__all__):
        assert f"[focal_torch.{name}]" in index, f"{name} is missing from the twin table"


def test_changelog_page_includes_the_changelog():
    assert '--8<-- "CHANGELOG.md"' in (DOCS / "changelog.md").read_text()


def test_every_example_is_in_the_gallery():
    gallery = (DOCS / "examples.md").read_text()
    for script in sorted((ROOT / "examples").glob("*.py")):
        assert f"python examples/{script.name}" in gallery, f"{script.name} is not in the gallery"
    for figure in sorted((ROOT / "examples" / "figures").glob("*.png")):
        assert f"figures/{figure.name})" in gallery, f"{figure.name} is not in the gallery"


def test_version_is_one_and_the_same():
    import focal_jax
    import focal_spec
    import focal_torch

    version = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)
    assert focal_spec.__version__ == focal_jax.__version__ == focal_torch.__version__ == version
    assert f"## [{version}]" in (ROOT / "CHANGELOG.md").read_text()
