"""The results ledger, RESULTS_DIR/results.csv: one row per run, appended under a lock, checked before a run starts."""
import contextlib
import csv
import fcntl
import os
from typing import Iterator, Optional

import pandas as pd

from harness import errors, files
from harness.cli import RESUMABLE, defaults

COLUMNS = ["run_id", "method", "script", "status", "model_id", "samples", "trainable_params", "tokens", "correct",
           "total", "score", "restricted_correct", "restricted_score", "label_answer_share", "score_low", "score_high",
           "restricted_low", "restricted_high", "seed", "best_epoch", "train_seconds", "score_seconds"]
TEXT_COLUMNS = ["run_id", "method", "script", "status", "model_id"]  # read as text, so "" stays "", not NaN


def path(results_dir: str) -> str:
    return os.path.join(results_dir, "results.csv")


@contextlib.contextmanager
def _locked(results_dir: str) -> Iterator[None]:
    """Every write of the ledger holds this lock, a file of its own, so a ledger replaced by rename stays locked."""
    files.folder(results_dir, "--results_dir")
    with open(os.path.join(results_dir, ".results.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read_lines(ledger: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a ledger; a one-line error naming the first damaged line."""
    fix = f"fix that line or move the file aside (mv {ledger} {ledger}.old)"
    with open(ledger, "rb") as f:
        raw = f.read()
    for number, line in enumerate(raw.split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            raise errors.UserError(f"{ledger} line {number} has bytes that are not UTF-8: {fix}") from None
    if raw and not raw.endswith(b"\n"):
        last = raw.count(b"\n") + 1
        raise errors.UserError(f"{ledger} line {last} is cut short (no line end): {fix}")
    rows = list(csv.reader(raw.decode("utf-8").splitlines()))
    header = rows[0] if rows else COLUMNS
    if "run_id" not in header:
        raise errors.UserError(f"{ledger} is not a ledger (no run_id column): move it aside (mv {ledger} {ledger}.old)")
    for number, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise errors.UserError(f"{ledger} line {number} has {len(row)} fields, not {len(header)}: {fix}")
    return header, rows[1:]


def check(results_dir: str) -> None:
    """A one-line error if the ledger cannot take a row (a damaged file, a results folder that is a file or not
    writable): so it is found before the work, not after."""
    if os.path.exists(path(results_dir)):
        _read_lines(path(results_dir))
    files.folder(results_dir, "--results_dir")


def add_row(results_dir: str, row: dict) -> None:
    """Add one row at the end under the lock, so runs that finish together all keep theirs. Rows already there are
    never rewritten, but for a ledger of an older version, whose columns gain this version's once (their text kept)."""
    ledger = path(results_dir)
    with _locked(results_dir):
        header, rows = _read_lines(ledger) if os.path.exists(ledger) else (COLUMNS, [])
        if not os.path.exists(ledger) or header[:len(COLUMNS)] != COLUMNS:
            columns = COLUMNS + [c for c in header if c not in COLUMNS]
            with files.atomic_path(ledger) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerows([columns] + [[dict(zip(header, r)).get(c, "") for c in columns] for r in rows])
            header = columns
        with open(ledger, "a", encoding="utf-8", newline="") as f:
            csv.writer(f, lineterminator="\n").writerow(["" if row.get(c) is None else row[c] for c in header])
            f.flush()
            os.fsync(f.fileno())


def rows(results_dir: str) -> list[dict]:
    """Every ledger row, in order, with this version's columns (empty where an older ledger lacks one)."""
    if not os.path.exists(path(results_dir)):
        return []
    table = pd.read_csv(path(results_dir), dtype={c: str for c in TEXT_COLUMNS}, keep_default_na=False)
    return table.reindex(columns=list(dict.fromkeys(COLUMNS + list(table.columns))), fill_value="").to_dict("records")


def format_score(row: dict, name: str) -> str:
    """Score `name` ("score" or "restricted") of a metrics row as a percentage with its 95% Wilson interval's
    half-width in points, e.g. "95.9% ±0.2" (the interval is asymmetric: its bounds are in the ledger)."""
    share = row["score"] if name == "score" else row["restricted_score"]
    return f"{100 * share:.1f}% ±{50 * (row[name + '_high'] - row[name + '_low']):.1f}"


def format_table(rows: list[dict]) -> str:
    """Ledger rows in the reference's form (Train reviews | Tokens | Score | Correct / Total) with the run, its
    method, trainable parameters, the label-restricted score, the best validation epoch and the status."""
    lines = ["| Run | Method | Train reviews | Params | Tokens | Score | Correct / Total | Label-restricted "
             "| Best epoch | Status |", "|---" * 10 + "|"]
    count = lambda value: f"{int(value):,}" if value not in ("", None) and value == value and int(value) else "–"
    for r in rows:
        lines.append(f"| {r['run_id']} | {r['method'] or r['script']} | {count(r['samples'])} "
                     f"| {count(r['trainable_params'])} | {int(r['tokens'])} | {format_score(r, 'score')} "
                     f"| {int(r['correct']):,} / {int(r['total']):,} "
                     f"| {format_score(r, 'restricted')} | {count(r['best_epoch'])} | {r['status'] or '–'} |")
    return "\n".join(lines)


# cannot change a result: what a resume may change, but the device; what a setting fitted to the data was asked to be
NEUTRAL_KEYS = RESUMABLE - {"DEVICE"} | {"RESUME", "ASKED"}
TRAINING_KEYS = {"TRAIN_LIMIT", "TRAIN_REVIEWS", "BATCH_SIZE", "PRIMER_LENGTH", "RATE_BY_EPOCH", "RATE_SCALE",
                 "PRIMER_PATH", "PRIMER_POSITION", "PRIMER_INIT", "VAL_LIMIT", "KEEP_BEST"}  # a text prompt uses none
TEXT_PROMPT_SCRIPTS = ("prompt_long", "prompt_short")


def result_config(script: str, config: dict) -> dict:
    """What decides a run's result: its config (uppercase keys) less the keys that cannot change it."""
    config = {**defaults(), **{k.upper(): v for k, v in config.items()}}  # a setting added since ran at its default
    untrained = script in TEXT_PROMPT_SCRIPTS and not config.get("SHOTS")  # shots are drawn from the training split
    ignored = NEUTRAL_KEYS | (TRAINING_KEYS if untrained else set())
    return {k: v for k, v in config.items() if k not in ignored}


def run_config(results_dir: str, row: dict) -> Optional[dict]:
    """The config.json of a ledger row's run folder, or None where the folder is gone."""
    path = os.path.join(results_dir, row["run_id"], "config.json")
    return files.read_json(path) if os.path.exists(path) else None
