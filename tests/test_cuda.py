"""What running on a GPU takes. On any machine: every tensor that meets the activations is moved to their device and
dtype, and the forward and the training step read nothing back from the device (both checked on the `meta` device,
where a read-back or a mix of devices raises); a loss found non-finite steps later rolls back exactly as one found at
once; padding to buckets changes no answer. On a CUDA machine (skipped elsewhere): every script on the tiny model in
bfloat16, batching that changes no answer, and a training step under torch.cuda.set_sync_debug_mode("error").

    python -m pytest -q tests/test_cuda.py        # on a GPU machine: the CPU checks and the CUDA runs
"""
import copy
import glob
import json
import os

import pytest
import torch

from conftest import overrides, run_script
from harness import checkpoints, cli, frozen, layouts, ledger, primers, runs, scoring, training

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
POSITIONS = layouts.PRIMER_POSITIONS


@pytest.fixture(scope="module")
def task(tiny, tmp_path_factory):
    return runs.setup(cli.configure(overrides(tiny, tmp_path_factory.mktemp("cuda"))))


@pytest.fixture(scope="module")
def meta(task):
    """The tiny model on the meta device in bfloat16: any tensor left on the CPU, or any value read back, raises."""
    model = copy.deepcopy(task.model).to(device="meta", dtype=torch.bfloat16)
    return runs.Task(task.cfg, task.tokenizer, model, torch.device("meta"), task.label_ids.to("meta"), task.train,
                     task.test)


@pytest.mark.parametrize("position", POSITIONS)
def test_cpu_inputs_primers_and_steering_vectors_meet_the_activations_on_their_device(task, meta, position):
    """Ids, lengths, a float32 primer and a float32 steering vector all on the CPU, the model elsewhere: the forward
    moves each to the activations' device and dtype (the steering hook once crashed on CUDA here)."""
    layout = layouts.make_layout(task, None, primer_length=4, position=position)
    ids, lengths = layouts.assemble(layout, task.train, torch.arange(5))
    primer, vector = torch.zeros(4, 64), torch.zeros(64)
    for steer in (frozen.Steer(vector, (1,), 2.0, after_review=True), frozen.Steer(vector, (2,), 1.0)):
        out = frozen.forward(meta.model, ids, lengths, layout, primer, steer=steer, layers=(0, 1))
        assert out.logits.device.type == "meta" and out.logits.shape == (5, task.model.config.vocab_size)
        assert out.last[1].device.type == out.mean[0].device.type == "meta"
    assert frozen.forward(meta.model, ids, lengths, layout, primer).logits.dtype == torch.float32
    kept = frozen.forward(meta.model, ids, lengths, layout, steer=frozen.Steer(vector, (2,), 1.0))  # layer 1 kept
    assert kept.logits.device.type == "meta" and kept.logits.dtype == torch.float32


@pytest.mark.parametrize("position", ("system", "suffix"))
def test_a_training_step_reads_nothing_back_from_the_device(task, meta, position):
    """train_step with the primer's real loss, and what the loop keeps to undo it, on the meta device: a `.item()`,
    a `bool(tensor)` or a mask check there (a host-device sync on a GPU) would raise."""
    layout = layouts.make_layout(task, None, primer_length=4, position=position)
    primer = torch.zeros(4, 64, device="meta", requires_grad=True)
    optimizer = torch.optim.Adam([primer], lr=0.1)
    for step in range(2):  # the second step runs on Adam's state
        kept = training.Pending(None, checkpoints.snapshot({"primer": primer}),
                                checkpoints.optimizer_state(optimizer, [primer]), 0.0, 0.1)
        loss = training.train_step([primer], optimizer, primers.loss_of(meta, layout, primer),
                                   torch.arange(4 * step, 4 * step + 4))
        assert loss.device.type == "meta" and kept.before["primer"].device.type == "meta"
    assert optimizer.state[primer]["exp_avg"].device.type == "meta"


def test_a_non_finite_loss_found_steps_later_rolls_back_as_one_found_at_once(task, tmp_path, monkeypatch):
    """A NaN at the 7th step, read at once (CHECK_EVERY 1) or 5 steps later (CHECK_EVERY 12): the same log, tensors,
    checkpoint (Adam's state as after the 6th step) and status."""
    layout = layouts.make_layout(task, None, primer_length=4)

    def run(check_every: int, folder: str):
        primer = primers.init_primer(task.model, 4, seed=0)
        loss_of, calls = primers.loss_of(task, layout, primer), []

        def poisoned(shard, batch_size):
            calls.append(1)
            return loss_of(shard, batch_size) * (float("nan") if len(calls) == 7 else 1.0)
        monkeypatch.setattr(training, "CHECK_EVERY", check_every)
        os.makedirs(tmp_path / folder)
        log, status = training.train(task, {"primer": primer}, poisoned, str(tmp_path / folder),
                                     training.Schedule.of(task.cfg))
        return (log, status, primer.detach(), torch.load(tmp_path / folder / "checkpoint.pt", weights_only=True),
                len(calls))

    at_once, later = run(1, "at_once"), run(12, "later")
    assert at_once[4] == 7 and later[4] == 10  # the late check ran the whole first epoch's 10 steps
    untimed = lambda log: [{k: v for k, v in row.items() if k not in ("seconds", "cpu_seconds")} for row in log]
    assert untimed(later[0]) == untimed(at_once[0]) and len(later[0]) == 6
    assert later[1] == at_once[1] == "stopped early at epoch 1, batch 6: non-finite loss nan"
    assert torch.equal(later[2], at_once[2])
    assert (later[3]["epoch"], later[3]["batch"], untimed(later[3]["log"])) == (0, 6, untimed(at_once[3]["log"]))
    (state_now,), (state_late,) = at_once[3]["optimizer"]["state"].values(), later[3]["optimizer"]["state"].values()
    assert all(torch.equal(state_now[k], state_late[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert float(state_late["step"]) == 6 and torch.equal(later[3]["params"]["primer"], later[2])


@pytest.mark.parametrize("position", ("system", "suffix"))
def test_padding_batches_to_a_multiple_of_64_changes_no_answer(task, monkeypatch, position):
    layout = layouts.make_layout(task, None, primer_length=4, position=position)
    primer = primers.init_primer(task.model, 4, seed=1)
    plain = scoring.predict(task, layout, primer)
    monkeypatch.setattr(layouts, "PAD_MULTIPLE", 64)
    ids, lengths = layouts.assemble(layout, task.test, torch.arange(10))
    assert ids.shape[1] % 64 == 0 and ids.shape[1] > int(lengths.max())
    padded = scoring.predict(task, layout, primer)
    assert torch.equal(padded["answer"], plain["answer"])
    torch.testing.assert_close(padded["logprobs"], plain["logprobs"], atol=1e-5, rtol=1e-5)


def test_joined_review_ids_are_made_once_and_are_the_tokenizers_own(task):
    layout = layouts.make_layout(task, None, primer_length=4)  # its joins are tokenized with the review
    assert layout.joins != ("", "")
    idx = torch.tensor([3, 0, 3, 7])
    first = layouts.assemble(layout, task.test, idx)
    assert set(layout.cache[id(task.test)][1]) == {0, 3, 7}
    fresh = layouts.make_layout(task, None, primer_length=4)
    for a, b in zip(first, layouts.assemble(fresh, task.test, idx)):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(first, layouts.assemble(layout, task.test, idx)))  # from the cache
    subset = task.test.subset(torch.arange(5))
    layouts.assemble(layout, subset, torch.arange(2))
    key = id(subset)
    del subset
    assert key not in layout.cache  # a split's ids go with it


def test_a_gguf_is_dequantized_without_looking_for_packed_kernels(task, monkeypatch):
    """transformers 5.24 keeps a GGUF's weights packed wherever it finds its kernels (for the architectures of its
    new loader: qwen35, lfm2; llama's legacy loader always dequantizes): with load_model's keywords its quantizer
    decides to dequantize without looking for them; without, it looks."""
    from transformers.quantizers import quantizer_gguf

    import real
    from harness import hub

    def looked():
        raise AssertionError("transformers looked for GGUF kernels: "
                             "the weights could stay packed on a machine that has them")
    monkeypatch.setattr(quantizer_gguf, "get_gguf_kernel", looked)
    path = real.model_path()  # SmolLM2's Q4_1 file: llama, so read as if its architecture had the packed path
    for config, packs in ((hub._model_kwargs(path, None)["quantization_config"], False),
                          (quantizer_gguf.GgufConfig(), True)):
        quantizer = quantizer_gguf.GgufHfQuantizer(config)
        quantizer.read_header(path)
        quantizer.supported, quantizer.header = True, quantizer_gguf.GgufHeader.from_file(path)
        assert quantizer.header.has_quantized_weights
        if packs:
            with pytest.raises(AssertionError, match="looked for GGUF kernels"):
                quantizer.validate_environment()
        else:
            quantizer.validate_environment()
            assert quantizer.quantization_config.dequantize
    assert hub._model_kwargs(task.cfg.MODEL_ID, None) == {} and hub.packed_gguf(task.model) is False


# ---- on a CUDA GPU ----

def cuda_args(tiny, out, *more: str) -> list[str]:
    return [a for a in overrides(tiny, out) if a != "--device=cpu"] + ["--device=cuda", "--dtype=bfloat16", *more]


def one_row(out) -> dict:
    """The newest ledger row under out, checked to be a CUDA bfloat16 run with a score."""
    row = ledger.rows(f"{out}/results")[-1]
    environment = json.load(open(f"{out}/results/{row['run_id']}/environment.json"))
    assert environment["device"].startswith("cuda") and environment["dtype"] == "bfloat16", environment
    assert environment["attention"] != "CUDNN_ATTENTION" and environment["gguf_packed"] is False
    assert 0 <= float(row["score"]) <= 1 and int(row["total"]) == 60
    return row


@CUDA
def test_every_script_runs_on_cuda_in_bfloat16(tiny, tmp_path, monkeypatch):
    import bake
    import experiment
    import probe
    import search_prompt
    import steer
    import sweep
    for position in POSITIONS:
        experiment.run(cli.configure(cuda_args(tiny, tmp_path / position, f"--primer_position={position}",
                                               "--rate_by_epoch=[0.1]")))
        assert one_row(tmp_path / position)["status"] == "finished"
    (primer,) = glob.glob(f"{tmp_path}/system/results/*-experiment/primer.safetensors")
    for script in ("prompt_long.py", "prompt_short.py"):
        result = run_script(script, *cuda_args(tiny, tmp_path / script))
        assert result.returncode == 0, result.stderr
        one_row(tmp_path / script)
    probe.run(cli.configure(cuda_args(tiny, tmp_path / "probe", "--train_limit=120", "--val_limit=40",
                                      "--probe_train=80"), probe.SETTINGS))
    one_row(tmp_path / "probe")
    for vector in ("pair", "mean", "learned"):
        steer.run(cli.configure(cuda_args(tiny, tmp_path / vector, f"--vector={vector}", "--val_limit=30",
                                          "--vector_reviews=20", "--steer_layers=[1, 2]", "--coefficients=[0.0, 0.5]",
                                          "--rate_by_epoch=[0.1]"), steer.SETTINGS))
        one_row(tmp_path / vector)
    steer.run(cli.configure(cuda_args(tiny, tmp_path / "generate", "--generate=True", f"--judge_path={primer}",
                                      "--val_limit=30", "--vector_reviews=20", "--samples=2", "--max_new_tokens=4",
                                      "--generate_coefficients=[0.0, 1.0]"), steer.SETTINGS))
    assert glob.glob(f"{tmp_path}/generate/results/*-steer/generation_summary.csv")
    for search in ("edit", "tokens"):
        search_prompt.run(cli.configure(cuda_args(tiny, tmp_path / search, f"--search={search}", "--val_limit=30",
                                                  "--steps=2", "--candidates=3"), search_prompt.SETTINGS))
        one_row(tmp_path / search)
    bake.run(cli.configure(cuda_args(tiny, tmp_path / "bake", "--lora_rank=4", "--rate_by_epoch=[1e-2]",
                                     "--val_limit=20"), bake.SETTINGS))
    one_row(tmp_path / "bake")
    monkeypatch.setattr(sweep, "GRID", [{"script": "experiment", "primer_length": 2, "rate_by_epoch": [0.1]},
                                        {"script": "experiment", "primer_length": 4, "rate_by_epoch": [0.1],
                                         "primer_position": "suffix"}])
    sweep.main(cli.configure(cuda_args(tiny, tmp_path / "sweep")))
    assert [int(r["tokens"]) for r in ledger.rows(f"{tmp_path}/sweep/results")] == [2, 4]
    result = run_script("bench.py", "--random_init=True", f"--model_id={tiny.model_dir}", "--device=cuda", "--steps=2",
                        "--warmup=1", "--batch_size=4", "--score_batch_size=8", "--max_review_tokens=64",
                        "--invariance=16")
    assert result.returncode == 0, result.stderr
    assert ("attention: EFFICIENT_ATTENTION (cuDNN off on CUDA)" in result.stdout
            or "attention: FLASH_ATTENTION" in result.stdout), result.stdout


@pytest.fixture(scope="module")
def gpu_task(tiny, tmp_path_factory):
    return runs.setup(cli.configure(cuda_args(tiny, tmp_path_factory.mktemp("gpu"))))


@CUDA
@pytest.mark.parametrize("position", POSITIONS)
def test_batching_changes_no_answer_on_cuda(gpu_task, position):
    """Each test review alone and in batches of 32, bfloat16 on CUDA: an answer may change only where its top two
    logits are closer than the largest move batching made."""
    layout = layouts.make_layout(gpu_task, None, primer_length=4, position=position)
    primer = primers.init_primer(gpu_task.model, 4, seed=1)
    logits = lambda idx: frozen.forward(gpu_task.model, *layouts.assemble(layout, gpu_task.test, idx), layout,
                                        primer).logits
    with torch.inference_mode():
        order = torch.arange(len(gpu_task.test))
        alone = torch.cat([logits(i[None]) for i in order])
        batched = torch.cat([logits(b) for b in order.split(32)])
    moved = (alone - batched).abs().max()
    top = alone.topk(2, dim=-1).values
    changed = alone.argmax(-1) != batched.argmax(-1)
    assert moved < 0.5 and ((top[:, 0] - top[:, 1])[changed] <= 2 * moved).all(), (moved, changed.sum())


@CUDA
@pytest.mark.parametrize("position", ("system", "suffix"))
def test_a_training_step_never_waits_on_the_gpu(gpu_task, position):
    layout = layouts.make_layout(gpu_task, None, primer_length=4, position=position)
    primer = primers.init_primer(gpu_task.model, 4, seed=0).requires_grad_(True)
    optimizer = torch.optim.Adam([primer], lr=0.1)
    loss_of = primers.loss_of(gpu_task, layout, primer)

    def step(batch: int) -> training.Pending:
        kept = training.Pending(None, checkpoints.snapshot({"primer": primer}),
                                checkpoints.optimizer_state(optimizer, [primer]), 0.0, 0.1)
        kept.loss = training.train_step([primer], optimizer, loss_of, torch.arange(6 * batch, 6 * batch + 6))
        return kept
    step(0)  # Adam's state and the allocator's blocks exist from here on
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kept = [step(b) for b in (1, 2, 3)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(k.loss) for k in kept)
