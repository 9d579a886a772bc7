"""probe.py on the tiny model: features, selection on validation only, the ledger row, reuse, and its errors.

The tiny model's weights are random, but its reviews differ in words (tiny.GOOD and tiny.BAD), so the mean of a
review's input embeddings (layer 0, mean pooling) carries the label linearly, and the last position's embedding
(always the same template token) carries nothing: a probe must find the one and not the other."""
import os
import types

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import probe
import table
from conftest import overrides, record_reads, run_script
from harness import activations, cli, files, ledger


def probe_args(tiny, out, *more: str) -> list[str]:
    return overrides(tiny, out) + ["--train_limit=120", "--val_limit=40", "--probe_train=80", *more]


def run_probe(args: list[str], monkeypatch) -> list[dict]:
    """Run probe.py in this process; its extract() calls (conftest.record_reads), "chosen" once the layer table is
    written."""
    calls = record_reads(monkeypatch, activations, "extract", "probe_layers.csv")
    probe.run(cli.configure(args, probe.SETTINGS))
    return calls


@pytest.fixture(scope="module")
def probed(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = run_probe(probe_args(tiny, out), monkeypatch)
    (run_dir,) = [e.path for e in os.scandir(out / "results") if e.is_dir()]
    layers = pd.read_csv(os.path.join(run_dir, "probe_layers.csv"))
    return types.SimpleNamespace(out=out, calls=calls, run_dir=run_dir, table=layers)


def test_features_are_every_layer_and_both_poolings_and_the_test_split_only_the_chosen_one(probed):
    train = load_file(os.path.join(probed.run_dir, "features-train.safetensors"))
    val = load_file(os.path.join(probed.run_dir, "features-val.safetensors"))
    test = load_file(os.path.join(probed.run_dir, "features-test.safetensors"))
    assert {k: tuple(v.shape) for k, v in train.items()} == {"last": (3, 80, 64), "mean": (3, 80, 64), "labels": (80,)}
    assert {k: tuple(v.shape) for k, v in val.items()} == {"last": (3, 40, 64), "mean": (3, 40, 64), "labels": (40,)}
    best = probed.table.iloc[probed.table["val_score"].argmax()]
    assert {k: tuple(v.shape) for k, v in test.items()} == {best["pooling"]: (1, 60, 64), "labels": (60,)}
    assert all(v.dtype == torch.float16 for f in (train, val, test) for k, v in f.items() if k != "labels")


def test_the_label_is_read_where_it_is_and_selection_never_reads_the_test_split(probed):
    scores = probed.table.set_index(["layer", "pooling"])["val_score"]
    assert scores[0, "mean"] >= 0.85  # bag of words: separable
    assert scores[0, "last"] <= 0.6  # one template token for every review: nothing to read
    assert len(probed.table) == 6 and set(probed.table["val_total"]) == {40}
    *before, last = probed.calls
    assert [c["test"] for c in before] == [False, False] and [len(c["split"]) for c in before] == [80, 40]
    assert last["test"] and last["chosen"] and last["layers"] == (0,)


def test_the_ledger_row_csv_and_figure_are_written(probed):
    (row,) = ledger.rows(str(probed.out / "results"))
    assert row["script"] == "probe" and row["method"] == "linear probe (layer 0, mean)"
    assert row["trainable_params"] == 65 and row["samples"] == 80 and row["tokens"] == 0
    assert row["score"] == row["restricted_score"] >= 0.8  # a probe answers only with a label
    assert os.path.getsize(os.path.join(probed.run_dir, "probe_layers.png")) > 0
    weight = load_file(os.path.join(probed.run_dir, "probe.safetensors"))["weight"]
    assert weight.shape == (64,)
    # its cost: the CPU seconds of its features, fits and scoring, which it times itself
    metrics = files.read_json(os.path.join(probed.run_dir, "metrics.json"))
    cost = table.load_runs(str(probed.out / "results")).set_index("run_id")["core_seconds"][row["run_id"]]
    assert cost == pytest.approx(metrics["train_cpu_seconds"] + metrics["score_cpu_seconds"])
    assert metrics["train_cpu_seconds"] > 0 and "score_cpu_seconds" in metrics


def test_a_second_run_reuses_the_features_and_gets_the_same_table(probed, tiny, monkeypatch):
    calls = run_probe(probe_args(tiny, probed.out), monkeypatch)
    assert calls == []
    second = max(e.path for e in os.scandir(probed.out / "results") if e.is_dir())
    pd.testing.assert_frame_equal(pd.read_csv(os.path.join(second, "probe_layers.csv")), probed.table)


# the MLP on a random model's features of 80 reviews stops at its 300 iterations, not converged, at the weakest
# regularization of PROBE_C; the test reads the accuracy that the probe chosen on validation reaches, not convergence
@pytest.mark.filterwarnings("ignore:Stochastic Optimizer. Maximum iterations:sklearn.exceptions.ConvergenceWarning")
def test_shuffled_labels_stay_near_chance_and_the_mlp_reads_what_the_linear_probe_reads(probed):
    train, val = (load_file(os.path.join(probed.run_dir, f"features-{name}.safetensors")) for name in ("train", "val"))
    x_train, x_val = {"mean": train["mean"].float()}, {"mean": val["mean"].float()}
    cfg = cli.configure([], probe.SETTINGS)
    shuffled = np.random.default_rng(0).permutation(train["labels"].numpy())
    fitted, _ = probe.fit_layers(cfg, x_train, x_val, shuffled, val["labels"].numpy(), range(1))
    assert fitted["val_score"][0] <= 0.75
    cfg.PROBE = "mlp"
    fitted, _ = probe.fit_layers(cfg, x_train, x_val, train["labels"].numpy(), val["labels"].numpy(), range(1))
    assert fitted["val_score"][0] >= 0.85


def test_the_command_line_exits_with_one_line(tiny, tmp_path):
    result = run_script("probe.py", *probe_args(tiny, tmp_path), "--pooling=max")
    assert result.returncode == 1 and result.stderr.strip() == "error: --pooling='max' is not one of last, mean, both"
