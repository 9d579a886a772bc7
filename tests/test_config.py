import ast
import glob
import os
import shlex

import pytest

import bench
import config
import experiment
from conftest import ROOT, run_script
from harness import cli, errors, hub


def test_overrides_are_parsed_and_typed():
    cfg = cli.configure(["--batch_size=3", "--rate_by_epoch=[1, 1e-5]", "--primer_path=results/x/primer.safetensors",
                         "--model_id=some/model", "--labels=['neg', 'pos']"])
    assert cfg.BATCH_SIZE == 3
    assert cfg.RATE_BY_EPOCH == [1, 1e-5]
    assert cfg.PRIMER_PATH == "results/x/primer.safetensors"
    assert cfg.MODEL_ID == "some/model"
    assert cfg.LABELS == ["neg", "pos"]
    assert cli.configure([]).BATCH_SIZE == cli.defaults()["BATCH_SIZE"]


@pytest.mark.parametrize("arg, message", [
    ("--batch_size=big", "wrong type"),
    ("--batch_size=2.5", "wrong type"),
    ("--rate_by_epoch=1e-4", "a list"),
    ("--primer_path=3", "path string"),
    ("--batchsize=3", "did you mean --batch_size?"),
    ("--rate_by_epch=[1e-4]", "did you mean --rate_by_epoch?"),
    ("batch_size=3", "--name=value"),
])
def test_bad_overrides_are_refused(arg, message):
    with pytest.raises(errors.UserError, match=message.replace("?", r"\?").replace("[", r"\[")):
        cli.configure([arg])


def test_command_line_error_is_one_line_and_nonzero():
    result = run_script("experiment.py", "--batchsize=3")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: unknown config key --batchsize: did you mean --batch_size? "
                                                  "(keys are config.py's constants, in lowercase)"]


def test_help_prints_the_purpose_and_every_setting_with_its_default_and_comment():
    result = run_script("experiment.py", "--help")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith(experiment.__doc__.strip() + "\n")
    assert ("  --primer_length=4\n        number of trained embedding vectors in the system-prompt slot\n"
            in result.stdout)
    comments = cli.setting_comments(config.__file__)
    for name, value in cli.defaults().items():
        assert comments[name], f"config.py's {name} has no comment"
        assert f"  --{name.lower()}={value!r}\n        {comments[name]}\n" in result.stdout
    # a script's own constants
    assert "  --steps=10\n        timed batches per measurement" in cli.usage(bench, bench.BENCH)


def test_a_space_instead_of_equals_shows_the_override_to_write():
    with pytest.raises(errors.UserError, match="^write --primer_length=8, with '=' and no space"):
        cli.configure(["--primer_length", "8"])
    with pytest.raises(errors.UserError, match="^write --keep_best=True,"):
        cli.configure(["--keep_best", "--seed=1"])


def test_shell_args_read_back_as_the_same_config():
    values = {"CSV_DIR": "my data", "DATA_DIR": "123", "MODEL_ID": "a/b", "RATE_BY_EPOCH": [0.1, 1e-5], "SEED": 3}
    line = cli.shell_args(values)
    # quoted only where needed
    assert line.startswith("'--csv_dir=my data' '--data_dir=") and " --model_id=a/b " in line
    cfg = cli.configure(shlex.split(line))
    assert {k: getattr(cfg, k) for k in values} == values


def test_a_gguf_model_id_is_loaded_as_folder_and_file():
    assert hub._gguf_source("/m/SmolLM2.Q4_1.gguf", None) == ("/m", {"gguf_file": "SmolLM2.Q4_1.gguf"})
    assert hub._gguf_source("SmolLM2.Q4_1.gguf", None) == (".", {"gguf_file": "SmolLM2.Q4_1.gguf"})
    assert hub._gguf_source("org/model-GGUF", "model.Q8_0.gguf") == ("org/model-GGUF", {"gguf_file": "model.Q8_0.gguf"})
    assert hub._gguf_source("org/model", None) == ("org/model", {})


def test_a_script_that_declares_its_settings_shows_only_those():
    import real
    import tiny
    shown = cli.usage(real, real.REAL, ("SEED",))
    assert ("defaults from config.py and real.py" in shown and "--model_id" not in shown
            and "  --test_snippets=2400\n" in shown)
    assert cli.usage(tiny, None, ()).endswith("\n\nsettings: none")
    assert vars(cli.configure([], shared=())) == {}


def test_the_package_reads_only_config_settings_and_nothing_but_a_parser_assigns_them():
    """harness/ reads cfg.NAME only where config.py declares NAME (a script's own settings are read in that script and
    passed on as values), and only the command-line parsers (harness/cli.py, a script's parse) assign to a config."""
    declared = {name for name in vars(config) if name.isupper()}
    read, assigned = [], []
    for path in sorted(glob.glob(os.path.join(ROOT, "harness", "*.py")) + glob.glob(os.path.join(ROOT, "*.py"))):
        tree = ast.parse(open(path, encoding="utf-8").read())
        parsers = [range(f.lineno, f.end_lineno + 1) for f in ast.walk(tree)
                   if isinstance(f, ast.FunctionDef) and (f.name == "parse" or path.endswith("harness/cli.py"))]
        for node in ast.walk(tree):
            if not hasattr(node, "lineno") or any(node.lineno in lines for lines in parsers):
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                assigned += [f"{path}:{node.lineno}" for t in targets if isinstance(t, ast.Attribute)
                             and t.attr.isupper() and "cfg" in ast.unparse(t.value)]
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr":
                assigned += [f"{path}:{node.lineno}"] if "cfg" in ast.unparse(node.args[0]) else []
            if (os.path.basename(os.path.dirname(path)) == "harness" and isinstance(node, ast.Attribute)
                    and node.attr.isupper() and ast.unparse(node.value).endswith("cfg") and node.attr not in declared):
                read.append(f"{path}:{node.lineno} {node.attr}")
    assert not read, "harness/ reads settings config.py does not declare: pass them as values\n" + "\n".join(read)
    assert not assigned, "the config is assigned outside a parser:\n" + "\n".join(assigned)
