"""The tree passes `ruff check` under pyproject.toml's rules (line length 120, pyflakes, pycodestyle, import order),
and those rules do catch what they name; the package's helpers are private."""
import ast
import glob
import os
import re
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


def test_a_helper_no_other_file_calls_is_private():
    """A function or class of harness/ that no script, other module or test names is a helper: its name starts with
    `_`, so what reads as the package's API is what something outside the module uses."""
    sources = {path: open(path, encoding="utf-8").read()
               for folder in (ROOT, os.path.join(ROOT, "harness"), os.path.join(ROOT, "tests"))
               for path in glob.glob(os.path.join(folder, "*.py"))}
    public_only_inside = []
    for path in sorted(glob.glob(os.path.join(ROOT, "harness", "*.py"))):
        module = os.path.basename(path)[:-3]
        tree = ast.parse(sources[path])
        in_signatures = {name.id for node in tree.body if isinstance(node, ast.FunctionDef)
                         and not node.name.startswith("_") for part in (node.returns, *node.args.args) if part
                         for name in ast.walk(part) if isinstance(name, ast.Name)}  # a type the API returns or takes
        for node in tree.body:
            if (not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_")
                    or node.name in in_signatures):
                continue
            used = re.compile(rf"\b{module}\.{node.name}\b|from harness\.{module} import [^\n]*\b{node.name}\b")
            if not any(used.search(text) for other, text in sources.items() if other != path):
                public_only_inside.append(f"harness/{module}.py: {node.name}")
    assert not public_only_inside, "used only inside their module; name them _name:\n" + "\n".join(public_only_inside)
