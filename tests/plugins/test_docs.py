"""docs/plugins.md says what the code does: its example is docs/examples/sender_blocklist.py
(the same code, docstrings aside), its ``smtpgate plugins`` sample is that command's real
output, and its stand-alone test passes."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from .conftest import EXAMPLES, REPO

DOC = REPO / "docs" / "plugins.md"


def section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def blocks(text: str, lang: str = "") -> list[str]:
    """The fenced code blocks of ``text`` opened with ```` ```lang ````."""
    out = []
    parts = text.split("```")
    for i in range(1, len(parts), 2):
        head, _, body = parts[i].partition("\n")
        if head.strip() == lang:
            out.append(body)
    return out


def without_docstrings(source: str) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            kept = [n for n in body if not (isinstance(n, ast.Expr)
                                            and isinstance(n.value, ast.Constant)
                                            and isinstance(n.value.value, str))]
            node.body = kept or [ast.Pass()]
    return ast.dump(tree)


def test_example_in_docs_is_the_example_file() -> None:
    [code] = blocks(section("A complete example"), "python")
    assert without_docstrings(code) == without_docstrings(
        (EXAMPLES / "sender_blocklist.py").read_text())


def test_plugins_sample_output_is_real(tmp_path: Path) -> None:
    text = section("Seeing the chain: `smtpgate plugins`")
    [config] = blocks(text, "toml")
    sample = blocks(text)[0]
    command, _, expected = sample.partition("\n")
    assert command == "$ PYTHONPATH=docs/examples smtpgate plugins -c smtpgate.toml"
    (tmp_path / "smtpgate.toml").write_text(config)
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES)}
    out = subprocess.run([sys.executable, "-m", "smtpgate", "plugins", "-c", "smtpgate.toml"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected


def test_standalone_test_in_docs_passes(tmp_path: Path) -> None:
    [code] = blocks(section("Testing a plugin"), "python")
    test_file = tmp_path / "test_sender_blocklist_doc.py"
    test_file.write_text(code)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
         str(tmp_path), "-c", os.devnull, str(test_file)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed" in out.stdout
