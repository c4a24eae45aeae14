"""Every ```python block of README.md, of the algorithm READMEs and of docs/ runs as written, so a
documented example cannot rot. The blocks of one file run in order in one process (a later block
may use an earlier one's names), from the repository root. A block that cannot run here is
marked by the line ``<!-- not runnable: REASON -->`` right above it, and the reason is required."""
import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

DOCS = sorted(["README.md"] + [os.path.relpath(p, ROOT) for pattern in (("ms_prune", "*", "README.md"), ("docs", "*.md"),
                                                                          ("docs", "results", "*.md"))
                                 for p in glob.glob(os.path.join(ROOT, *pattern))])
BLOCK = re.compile(r"(<!--\s*not runnable:?(?P<reason>[^>]*)-->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def python_blocks(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    return [(m.group("code"), m.group(1) is not None, (m.group("reason") or "").strip()) for m in BLOCK.finditer(text)]


def _has_python(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return "```python" in f.read()


@pytest.mark.parametrize("path", [p for p in DOCS if _has_python(p)])
def test_documented_python_runs_as_written(path, tmp_path):
    blocks = python_blocks(path)
    for _, skipped, reason in blocks:
        assert not skipped or reason, f"{path}: a block marked 'not runnable' must say why"
    code = "\n".join(code for code, skipped, _ in blocks if not skipped)
    if not code.strip():
        pytest.skip(f"{path} has no runnable python block")
    script = tmp_path / "doc_blocks.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, f"{path}: its python blocks fail:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.mark.parametrize("path", DOCS)
def test_committed_files_the_docs_name_exist(path):
    # figures and configs a result table points at are committed (results/ is not)
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    named = set(re.findall(r"(?<![\w/.])((?:docs/figures|samples/configs)/[\w./-]+\.(?:png|yaml))", text))
    missing = sorted(p for p in named if not os.path.isfile(os.path.join(ROOT, p)))
    assert not missing, f"{path} names files that are not in the repository: {missing}"


@pytest.mark.parametrize("path", DOCS)
def test_the_docs_links_resolve(path):
    # a relative markdown link or image is a file beside the page (README -> docs/, pages -> figures)
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    links = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text)
    here = os.path.dirname(os.path.join(ROOT, path))
    broken = sorted(link for link in links if "://" not in link and not os.path.exists(os.path.join(here, link)))
    assert not broken, f"{path} links to files that do not exist: {broken}"
