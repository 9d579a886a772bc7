"""Train a primer (PRIMER_LENGTH embedding vectors in the system-prompt slot) on a frozen chat model, then score it.

    python experiment.py [--name=value ...]        # e.g. --primer_length=16 --train_limit=5600 --test_limit=2400
    python experiment.py --primer_path=results/<run id>/primer.safetensors   # score a saved primer, no training
    python experiment.py --resume=results/<run id>                            # continue an interrupted run
    python experiment.py --primer_position=suffix                             # the primer after the review
    python experiment.py --val_limit=2000 --primer_init=labels    # validate each epoch, stop when it stops improving
    python experiment.py --val_limit=200 '--rate_grid=[1e-1, 3e-2, 1e-2, 3e-3]'    # the rate chosen on validation
    python experiment.py --rate_scale=absolute '--rate_by_epoch=[1e-4, 1e-5, 1e-6]'   # the reference's schedule
"""
from harness import cli, primers, rategrid, rundir, runs, scoring, training
from harness.layouts import make_layout


def train_primer(task, layout, primer, run_dir: str) -> tuple[list[dict], str, float]:
    """The primer alone trained on the label token's cross-entropy under the config's schedule, rates in RATE_SCALE's
    unit (each rate of RATE_GRID, the best on validation kept), validated when VAL_LIMIT is set; a note when it barely
    moved. Its loss log, status and training seconds."""
    evaluate = (lambda: scoring.score(task, layout, primer, task.val)) if task.val is not None else None
    start = primer.detach().clone()
    method = f"{len(primer)}-token primer ({task.cfg.PRIMER_POSITION})"  # rate_grid.csv's, one line of the figure
    unit = primers.rate_unit(task)
    log, status, seconds = rategrid.train_grid(task, {"primer": primer}, primers.loss_of(task, layout, primer), run_dir,
                                               training.Schedule.of(task.cfg, unit), task.cfg.RATE_GRID, evaluate,
                                               method, "experiment.py", unit, rategrid.transfer_of(task.cfg))
    primers.note_stall(log, primer.detach() - start, primers.embedding_std(task.model))
    return log, status, seconds


def run(cfg) -> None:
    task = runs.setup(cfg, with_train=cfg.PRIMER_PATH is None)
    if cfg.PRIMER_PATH:
        primer = primers.load_primer(cfg.PRIMER_PATH, task.model, cfg.PRIMER_POSITION)
    else:
        primer = primers.initial_primer(task, cfg.PRIMER_INIT, cfg.PRIMER_LENGTH, cfg.SEED)
    layout = make_layout(task, None, primer_length=len(primer), position=cfg.PRIMER_POSITION)
    run_dir = rundir.new_or_resumed(cfg, "experiment")
    method = "primer" if cfg.PRIMER_PATH is None else "saved primer"
    method += "" if cfg.PRIMER_POSITION == "system" else f" ({cfg.PRIMER_POSITION})"  # the ledger tells positions apart
    log, status, seconds = (None, "finished", None) if cfg.PRIMER_PATH else train_primer(task, layout, primer, run_dir)
    primers.save_primer(run_dir, primer, cfg.MODEL_ID, cfg.PRIMER_POSITION)
    predictions = scoring.predict(task, layout, primer)
    runs.record(task, "experiment", method, len(primer), predictions, run_dir, log, primer.numel(), status,
                train_seconds=seconds)


if __name__ == "__main__":
    cli.main(run)
