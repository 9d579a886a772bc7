import pytest

import cli
from conftest import run_script


def test_overrides_are_parsed_and_typed():
    cfg = cli.configure(["--batch_size=3", "--rate_by_epoch=[1, 1e-5]", "--primer_path=results/x/primer.safetensors",
                         "--model_id=some/model", "--labels=['neg', 'pos']"])
    assert cfg.BATCH_SIZE == 3
    assert cfg.RATE_BY_EPOCH == [1.0, 1e-5] and all(isinstance(r, float) for r in cfg.RATE_BY_EPOCH)
    assert cfg.PRIMER_PATH == "results/x/primer.safetensors"
    assert cfg.MODEL_ID == "some/model"
    assert cfg.LABELS == ["neg", "pos"]
    assert cli.configure([]).BATCH_SIZE == cli.defaults()["BATCH_SIZE"]


@pytest.mark.parametrize("arg, message", [
    ("--batch_size=big", "wrong type"),
    ("--batch_size=2.5", "wrong type"),
    ("--rate_by_epoch=1e-4", "non-empty list"),
    ("--rate_by_epoch=['fast']", "a number"),
    ("--primer_path=3", "path string"),
    ("--batchsize=3", "did you mean --batch_size?"),
    ("--rate_by_epch=[1e-4]", "did you mean --rate_by_epoch?"),
    ("batch_size=3", "--name=value"),
])
def test_bad_overrides_are_refused(arg, message):
    with pytest.raises(cli.UserError, match=message.replace("?", r"\?").replace("[", r"\[")):
        cli.configure([arg])


def test_command_line_error_is_one_line_and_nonzero():
    result = run_script("experiment.py", "--batchsize=3")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: unknown config key --batchsize: did you mean --batch_size? "
                                                  "(keys are config.py's constants, in lowercase)"]


def test_a_gguf_model_id_is_loaded_as_folder_and_file():
    assert cli.gguf_source("/m/SmolLM2.Q4_1.gguf", None) == ("/m", {"gguf_file": "SmolLM2.Q4_1.gguf"})
    assert cli.gguf_source("SmolLM2.Q4_1.gguf", None) == (".", {"gguf_file": "SmolLM2.Q4_1.gguf"})
    assert cli.gguf_source("org/model-GGUF", "model.Q8_0.gguf") == ("org/model-GGUF", {"gguf_file": "model.Q8_0.gguf"})
    assert cli.gguf_source("org/model", None) == ("org/model", {})
