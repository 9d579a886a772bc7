"""Mistakes a user can make end with one line that says what to do."""
import importlib
import os
import re

import pytest
import torch
from safetensors.torch import save_file

import test_probe
import test_steer
import test_tune
from conftest import overrides, run_script
from harness import cli, data, errors, files, hub, layouts, ledger, primers, rundir


def test_missing_csvs_without_network_say_where_to_put_them(tiny, tmp_path):
    result = run_script("prep.sh", *overrides(tiny, tmp_path), f"--csv_dir={tmp_path}/nowhere")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: no CSVs in {tmp_path}/nowhere and fetching")
    assert "put the Yelp polarity train.csv and test.csv in" in result.stderr


def test_missing_csvs_with_the_hub_out_of_reach_fail_at_once_in_one_line(tiny, tmp_path):
    """No answer from the hub (here a closed port), offline mode off: one line after one request, where `datasets`
    printed 11 lines of retries over about 30 s (the lines are what this checks: a time bound fails on a busy
    machine)."""
    result = run_script("prep.sh", *overrides(tiny, tmp_path), f"--csv_dir={tmp_path}/nowhere",
                        env={"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
                             "HF_HOME": str(tmp_path / "hf")})
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode == 1 and line.startswith(f"error: no CSVs in {tmp_path}/nowhere and fetching "
                                                      "fancyzhx/yelp_polarity failed "
                                                      "(cannot reach http://127.0.0.1:9: ")


def test_labels_must_be_single_distinct_tokens(tiny):
    tokenizer = hub.load_tokenizer(tiny.model_dir)
    with pytest.raises(errors.UserError, match="not one: set --labels"):
        layouts.label_token_ids(tokenizer, ["negativity", "2"])
    with pytest.raises(errors.UserError, match="same token"):
        layouts.label_token_ids(tokenizer, ["1", "1"])


def test_primer_of_the_wrong_width_or_kind_is_refused(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny.model_dir)
    save_file({"primer": torch.zeros(4, 32)}, str(tmp_path / "primer.safetensors"))
    with pytest.raises(errors.UserError, match=r"shape \(4, 32\), but this model's embeddings are 64 wide"):
        primers.load_primer(str(tmp_path / "primer.safetensors"), model, "system")
    with pytest.raises(errors.UserError, match="does not exist"):
        primers.load_primer(str(tmp_path / "missing.safetensors"), model, "system")
    (tmp_path / "notes.txt").write_text("not a primer")
    with pytest.raises(errors.UserError, match="is not a primer file"):
        primers.load_primer(str(tmp_path / "notes.txt"), model, "system")
    save_file({"primer": torch.zeros(4, 64)}, str(tmp_path / "suffix.safetensors"),
              metadata={"primer_position": "suffix"})
    assert primers.load_primer(str(tmp_path / "suffix.safetensors"), model, "suffix").shape == (4, 64)
    primers.load_primer(str(tmp_path / "suffix.safetensors"), model, "system")
    assert "was trained at --primer_position=suffix and is scored at system" in capsys.readouterr().out


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(errors.UserError, match="is not a run folder"):
        cli.configure([f"--resume={tmp_path}"])


def test_out_of_memory_names_the_knobs(cfg, monkeypatch):
    def run(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr("sys.argv", ["experiment.py", "--batch_size=32", "--max_review_tokens=512"])
    with pytest.raises(SystemExit) as exit_:
        cli.main(run)
    assert exit_.value.code == ("error: out of GPU memory: lower --batch_size=32 (training) or --score_batch_size=32 "
                                "(scoring), lower --max_review_tokens=512, or set --gradient_checkpointing=True "
                                "(CUDA out of memory. Tried to allocate 2.00 GiB)")


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    monkeypatch.setattr("sys.argv", ["experiment.py"])
    with pytest.raises(ZeroDivisionError):  # not turned into a one-line exit
        cli.main(lambda cfg: 1 / 0)


def test_a_path_setting_naming_a_file_where_a_folder_is_wanted_is_one_line(tiny, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    result = run_script("experiment.py", *overrides(tiny, tmp_path), f"--results_dir={a_file}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [(f"error: --results_dir={a_file} is a file, not a folder: "
                                                   "set --results_dir to a folder you can write in")]
    cfg = cli.configure(overrides(tiny, tmp_path) + [f"--results_dir={a_file}/results"])
    with pytest.raises(errors.UserError,
                       match=f"^--results_dir={a_file}/results cannot be made: part of that path is a file"):
        rundir.new(cfg, "experiment")
    tokenizer = hub.load_tokenizer(tiny.model_dir)
    for setting in ("data_dir", "csv_dir"):
        cfg = cli.configure(overrides(tiny, tmp_path) + [f"--{setting}={a_file}"])
        with pytest.raises(errors.UserError,
                           match=f"^--{setting}={a_file} is a file, not a folder: set --{setting} to a folder"):
            data.prepare(cfg, tokenizer)
    assert a_file.read_text() == "not a folder" and not os.path.exists(tmp_path / "data")  # nothing written anywhere


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any folder")
def test_a_folder_without_write_permission_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(errors.UserError, match=f"^--results_dir={locked} is not writable by this user"):
            ledger.check(str(locked))
        with pytest.raises(errors.UserError, match="cannot be made: no permission to write there"):
            files.folder(str(locked / "results"), "--results_dir")
    finally:
        locked.chmod(0o700)

# each script's own settings that cannot work, refused in one line before any work (the args point it at the tiny model)
ARGS = {"probe": lambda tiny, out, *more: test_probe.probe_args(tiny, out, *more),
        "steer": lambda tiny, out, *more: test_steer.steer_args(tiny, out, *more),
        "tune": lambda tiny, out, *more: test_tune.tune_args(tiny, out, "loreft", *more)}


@pytest.mark.parametrize("script, setting, message", [
    ("probe", "--condition=nothing", "--condition='nothing' is not one of none, short, long, text:<words> or primer"),
    ("probe", "--pooling=max", "--pooling='max' is not one of last, mean, both"),
    ("probe", "--probe=svm", "--probe='svm' is not one of linear, mlp"),
    ("probe", "--condition=primer", "--condition=primer needs --primer_path="),
    ("probe", "--val_limit=0", "a probe's layer and regularization are chosen on validation reviews: set --val_limit"),
    ("probe", "--probe_train=81",
     "--probe_train=81 must be between 2 and the 80 training reviews left after --val_limit=40"),
    ("steer", "--vector=random", "--vector='random' is not one of pair, mean, learned"),
    ("steer", "--pair=['Love']", "--pair=['Love'] must be two different texts"),
    ("steer", "--prompt=medium", "--prompt='medium' is not one of short, long, text:<words>"),
    ("steer", "--val_limit=0", "layer and coefficient are chosen on validation reviews: set --val_limit"),
    ("steer", "--vector_path=nowhere.safetensors", "--vector_path=nowhere.safetensors does not exist"),
    ("steer", "--steer_layers=[3]", "--steer_layers=[3] must be decoder layers 1 to 2 of this model"),
    ("steer", "--vector_reviews=100", "--vector_reviews=100 must be between 1 and the 70 training reviews"),
    ("steer", "--vector_reviews=0", "--vector_reviews=0 must be at least 1"),
    ("tune", "--rate_by_epoch=['fast']", "--rate_by_epoch=['fast'] must be a list of numbers, one rate per epoch"),
    ("tune", "--val_limit=0 --rate_grid=[[1e-3]]",
     "--rate_grid chooses the rates on validation reviews: set --val_limit"),
    ("tune", "--method=bitfit", "--method='bitfit' is not one of lora, ia3, layernorm, prefix, loreft"),
    ("tune", "--rate_scale=embedding", "--rate_scale='embedding': tune.py's rates are Adam's own"),
    ("tune", "--reft_rank=0", "--reft_rank=0 must be at least 1"),
    ("tune", "--reft_layers=[3]", "--reft_layers=[3] must be different decoder layers 1 to 2 of this model"),
    ("tune", "--adapter_path=nowhere", "--adapter_path=nowhere does not exist"),
])
def test_bad_settings_of_a_script_are_one_line_errors(tiny, tmp_path, script, setting, message):
    module = importlib.import_module(script)
    with pytest.raises(errors.UserError, match="^" + re.escape(message)):
        module.run(cli.configure(ARGS[script](tiny, tmp_path, *setting.split()), module.SETTINGS))
