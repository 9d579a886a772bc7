"""The tree passes `ruff check` under pyproject.toml's rules (line length 120, pyflakes, pycodestyle, import order),
and those rules do catch what they name."""
import os
import subprocess
import sys

from conftest import ROOT


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_the_tree_has_no_lint_findings():
    result = ruff(".")
    assert result.returncode == 0, f"ruff check . found (`ruff check --fix .` sorts imports):\n{result.stdout}"


def test_the_rules_catch_a_long_line_an_unused_import_and_unsorted_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nimport os\n\nx = " + repr("a" * 160) + "\n")
    result = ruff("--config", os.path.join(ROOT, "pyproject.toml"), "--output-format", "concise", str(bad))
    assert result.returncode == 1
    for code in ("E501", "F401", "I001"):
        assert code in result.stdout, result.stdout
