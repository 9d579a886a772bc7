"""tune.py on the tiny model: LoRA, IA3, LayerNorm tuning, prefix tuning and LoReFT train on the label loss through the
shared loop, count their parameters, save an adapter that re-scores to the same counts; the prefix and LoReFT are
exact against the unpadded forward, LoReFT starts as the identity and resumes bitwise after a kill."""
import glob
import os

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import tune
from conftest import overrides, record_reads, run_until_first_checkpoint
from harness import adapters, cli, frozen, layouts, ledger, primers, reft, runs, scoring

# tiny: hidden 64, 2 layers, 4 heads of 16, 2 kv heads (kv width 32), MLP 128
PARAMS = {"lora": 4 * 2 * (64 + 64 + 64 + 32 + 64 + 32 + 64 + 64), "ia3": 2 * (32 + 32 + 128),
          "layernorm": 2 * 2 * 64 + 64, "prefix": 3 * 2 * 2 * 32, "loreft": 2 * (2 * 2 * 64 + 2)}
RATES = {"lora": "[1e-2, 1e-2]", "ia3": "[3e-2, 3e-2]", "layernorm": "[1e-2, 1e-2]", "prefix": "[3e-2, 3e-2]",
         "loreft": "[1e-2, 1e-2]"}


def tune_args(tiny, out, method: str, *more: str) -> list[str]:
    return overrides(tiny, out) + [f"--method={method}", "--lora_rank=4", "--prefix_length=3", "--reft_rank=2",
                                   "--reft_layers=[1, 2]", f"--rate_by_epoch={RATES[method]}", "--val_limit=20", *more]


@pytest.mark.parametrize("method", tune.METHODS)
def test_each_method_trains_on_the_labels_and_its_saved_adapter_scores_the_same(tiny, tmp_path, method):
    tune.run(cli.configure(tune_args(tiny, tmp_path, method), tune.SETTINGS))
    (run_dir,) = glob.glob(f"{tmp_path}/results/*-tune")
    log = pd.read_csv(f"{run_dir}/losses.csv")
    # 80 reviews in batches of 10, 2 epochs
    assert len(log) == 2 * 8 and log["loss"][-4:].mean() < log["loss"][:4].mean()
    assert list(pd.read_csv(f"{run_dir}/validation.csv")["epoch"]) == [1, 2]
    (row,) = ledger.rows(f"{tmp_path}/results")
    assert row["trainable_params"] == PARAMS[method] and row["samples"] == 80 and row["tokens"] == 0
    assert row["method"] == tune.describe(cli.configure(tune_args(tiny, tmp_path, method), tune.SETTINGS), (1, 2))
    path = f"{run_dir}/adapter" if method in adapters.PEFT_METHODS else f"{run_dir}/adapter.safetensors"
    assert os.path.exists(path)
    tune.run(cli.configure(tune_args(tiny, tmp_path, method, f"--adapter_path={path}"), tune.SETTINGS))
    first, again = ledger.rows(f"{tmp_path}/results")
    assert again["method"].startswith(f"saved {first['method']}") and again["trainable_params"] == PARAMS[method]
    assert (again["correct"], again["restricted_correct"]) == (first["correct"], first["restricted_correct"])


@pytest.fixture(scope="module")
def task(tiny, tmp_path_factory):
    return runs.setup(cli.configure(overrides(tiny, tmp_path_factory.mktemp("tune"))), with_train=False)


def batched_and_alone(task, model, layout, steer, idx=(5, 0, 9, 2)):
    """Logits of reviews idx in one right-padded batch, and each review's alone with no padding (the reference)."""
    ids, lengths = layouts.assemble(layout, task.test, torch.tensor(idx))
    with torch.no_grad():
        batched = frozen.forward(model, ids, lengths, layout, steer=steer).logits
        alone = [frozen.forward(model, ids[r:r + 1, :lengths[r]], lengths[r:r + 1], layout, steer=steer).logits[0]
                 for r in range(len(idx))]
    return batched, torch.stack(alone), ids, lengths


def test_the_prefix_is_the_cache_of_real_tokens_before_everything(task):
    layout = layouts.make_layout(task, None)
    prefix = adapters.initial_prefix(task, 3, seed=0)
    ordinary = primers.ordinary_tokens(task.tokenizer)
    tokens = ordinary[torch.randperm(len(ordinary), generator=torch.Generator().manual_seed(0))[:3]]
    batched, alone, ids, lengths = batched_and_alone(task, adapters.Prefixed(task.model, prefix), layout, None)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # at its start the prefix is exactly those tokens placed before the prompt
        for r in range(len(ids)):
            full = task.model(input_ids=torch.cat([tokens, ids[r, :lengths[r]]])[None]).logits[0, -1]
            torch.testing.assert_close(batched[r], full, atol=1e-4, rtol=1e-4)
    moved = adapters.Prefixed(task.model,
                              prefix + torch.randn(prefix.shape, generator=torch.Generator().manual_seed(1)))
    assert not torch.allclose(batched_and_alone(task, moved, layout, None)[0], batched, atol=1e-3)


def test_loreft_starts_as_the_identity_and_is_exact_against_the_unpadded_forward(task):
    layout = layouts.make_layout(task, "Classify.", "Review: {review}")
    edit = reft.LoReFT(64, 2, (1, 2), seed=0)
    rotation = edit.rotations[0].weight
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(2), atol=1e-5, rtol=1e-5)  # orthonormal rows
    plain = batched_and_alone(task, task.model, layout, None)[0]
    torch.testing.assert_close(batched_and_alone(task, task.model, layout, edit.steer())[0], plain)
    with torch.no_grad():
        for projection in edit.projections:
            projection.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
            projection.bias.normal_(0, 1.0)
    batched, alone, ids, lengths = batched_and_alone(task, task.model, layout, edit.steer())
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched, plain, atol=1e-3)
    for r in range(len(ids)):  # the formula, written out, on one unpadded row with hooks of its own
        row, cue = ids[r, :lengths[r]], int(lengths[r]) - len(layout.suffix)

        def formula(module, inputs, output, i):
            h = output[0] if isinstance(output, tuple) else output
            R, W, b = edit.rotations[i].weight, edit.projections[i].weight, edit.projections[i].bias
            h = torch.cat([h[:, :cue], h[:, cue:] + (h[:, cue:] @ W.T + b - h[:, cue:] @ R.T) @ R], 1)
            return (h, *output[1:]) if isinstance(output, tuple) else h
        handles = [task.model.get_decoder().layers[i].register_forward_hook(lambda m, a, o, i=i: formula(m, a, o, i))
                   for i in (0, 1)]
        try:
            with torch.no_grad():
                reference = task.model(input_ids=row[None]).logits[0, -1]
        finally:
            for handle in handles:
                handle.remove()
        torch.testing.assert_close(batched[r], reference, atol=1e-4, rtol=1e-4)


def test_loreft_resumes_bitwise_after_a_kill(tiny, tmp_path, monkeypatch):
    args = tune_args(tiny, tmp_path, "loreft", "--batch_size=4", "--checkpoint_every=5")
    tune.run(cli.configure(args + [f"--results_dir={tmp_path}/straight"], tune.SETTINGS))
    killed = f"{tmp_path}/killed"
    run_until_first_checkpoint(lambda: tune.run(cli.configure(args + [f"--results_dir={killed}"], tune.SETTINGS)),
                               monkeypatch)
    (run_killed,) = glob.glob(f"{killed}/*-tune")
    tune.run(cli.configure([f"--resume={run_killed}"], tune.SETTINGS))
    (straight,) = glob.glob(f"{tmp_path}/straight/*-tune")
    first, second = (load_file(f"{run}/adapter.safetensors") for run in (straight, run_killed))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_rate_grid_is_chosen_on_validation_and_drawn(tiny, tmp_path, monkeypatch):
    calls = record_reads(monkeypatch, scoring, "predict", "rate_grid.csv")
    tune.run(cli.configure(tune_args(tiny, tmp_path, "loreft", "--rate_grid=[[1e-5], [3e-2, 1e-2]]"), tune.SETTINGS))
    (run_dir,) = glob.glob(f"{tmp_path}/results/*-tune")
    grid = pd.read_csv(f"{run_dir}/rate_grid.csv")
    assert list(grid["rates"]) == ["[1e-05]", "[0.03, 0.01]"] and grid["chosen"].sum() == 1
    chosen = int(grid.index[grid["chosen"]][0])
    assert grid["val_correct"][chosen] == grid["val_correct"].max()
    *selection, final = calls
    assert len(selection) == 3 and not any(c["test"] for c in selection) and final["test"] and final["chosen"]
    trained = torch.load(f"{run_dir}/rates_{chosen}/checkpoint.pt", weights_only=True)["params"]
    saved = load_file(f"{run_dir}/adapter.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in trained.items())  # the chosen schedule's tensors are the ones kept
    assert not torch.equal(trained["projections.0.bias"], torch.zeros(2))
    (row,) = ledger.rows(f"{tmp_path}/results")
    assert row["best_epoch"] == grid["best_epoch"][chosen] and os.path.getsize(f"{tmp_path}/results/rate_grid.png") > 0
