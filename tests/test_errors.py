"""Mistakes a user can make end with one line that says what to do."""
import pytest
import torch
from safetensors.torch import save_file

import cli
import data
import frozen
import layouts
import primers
from conftest import overrides, run_script


def test_missing_csvs_without_network_say_where_to_put_them(tiny, tmp_path):
    result = run_script("prep.sh", *overrides(tiny, tmp_path), f"--csv_dir={tmp_path}/nowhere")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: no CSVs in {tmp_path}/nowhere and fetching")
    assert "put the Yelp polarity train.csv and test.csv in" in result.stderr


def test_unloadable_model_id_is_one_line(tmp_path):
    with pytest.raises(cli.UserError, match="check --model_id"):
        data.load_tokenizer(str(tmp_path / "no-such-model"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu():
    with pytest.raises(cli.UserError, match="torch sees no CUDA GPU"):
        frozen.resolve_device("cuda")


def test_labels_must_be_single_distinct_tokens(tiny):
    tokenizer = data.load_tokenizer(tiny.model_dir)
    with pytest.raises(cli.UserError, match="not one: set --labels"):
        layouts.label_token_ids(tokenizer, ["negativity", "2"])
    with pytest.raises(cli.UserError, match="same token"):
        layouts.label_token_ids(tokenizer, ["1", "1"])


def test_primer_of_the_wrong_width_or_kind_is_refused(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny.model_dir)
    save_file({"primer": torch.zeros(4, 32)}, str(tmp_path / "primer.safetensors"))
    with pytest.raises(cli.UserError, match=r"shape \(4, 32\), but this model's embeddings are 64 wide"):
        primers.load_primer(str(tmp_path / "primer.safetensors"), model, "system")
    with pytest.raises(cli.UserError, match="does not exist"):
        primers.load_primer(str(tmp_path / "missing.safetensors"), model, "system")
    (tmp_path / "notes.txt").write_text("not a primer")
    with pytest.raises(cli.UserError, match="is not a primer file"):
        primers.load_primer(str(tmp_path / "notes.txt"), model, "system")
    save_file({"primer": torch.zeros(4, 64)}, str(tmp_path / "suffix.safetensors"), metadata={"primer_position": "suffix"})
    assert primers.load_primer(str(tmp_path / "suffix.safetensors"), model, "suffix").shape == (4, 64)
    primers.load_primer(str(tmp_path / "suffix.safetensors"), model, "system")
    assert "was trained at --primer_position=suffix and is scored at system" in capsys.readouterr().out


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(cli.UserError, match="is not a run folder"):
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
