"""Train a primer (PRIMER_LENGTH embedding vectors in the system-prompt slot) on a frozen chat model, then score it.

    python experiment.py [--name=value ...]        # e.g. --primer_length=16 --train_limit=5600 --test_limit=2400
    python experiment.py --primer_path=results/<run id>/primer.safetensors   # score a saved primer, no training
    python experiment.py --resume=results/<run id>                            # continue an interrupted run
    python experiment.py --primer_position=suffix                             # the primer after the review (or "prefix")
    python experiment.py --val_limit=2000 --keep_best=True --primer_init=labels   # validate each epoch, keep the best
"""
import time

import cli
import harness


def run(cfg) -> None:
    if cfg.RESUME:
        cfg = harness.resumed_config(cfg.RESUME)
    harness.check_primer_position(cfg.PRIMER_POSITION, cfg.GRADIENT_CHECKPOINTING)  # before minutes of data prep and loading
    harness.check_rate_scale(cfg.RATE_SCALE)
    task = harness.setup(cfg, with_train=cfg.PRIMER_PATH is None)
    if cfg.PRIMER_PATH:
        primer = harness.load_primer(cfg.PRIMER_PATH, task.model, cfg.PRIMER_POSITION)
    else:
        primer = harness.initial_primer(task, cfg.PRIMER_INIT, cfg.PRIMER_LENGTH, cfg.SEED)
    layout = harness.make_layout(task, None, primer_length=len(primer), position=cfg.PRIMER_POSITION)
    run_dir = cfg.RESUME or harness.start_run(cfg, "experiment")
    start = time.perf_counter()
    log = None if cfg.PRIMER_PATH else harness.train(task, layout, primer, run_dir)
    train_seconds = time.perf_counter() - start  # this process's share when resumed
    harness.record(task, "experiment", layout, {**harness.timed_score(task, layout, primer), "train_seconds": train_seconds},
                   primer, log, run_dir)


if __name__ == "__main__":
    cli.main(run)
