"""The results ledger, RESULTS_DIR/results.csv: one row per run, appended under a lock, checked before a run starts."""
import csv
import fcntl
import os

import pandas as pd

import cli

COLUMNS = ["run_id", "script", "kind", "status", "model_id", "samples", "tokens", "primer_position", "lr_schedule",
           "correct", "total", "score", "restricted_correct", "restricted_score", "label_answer_share", "score_low",
           "score_high", "restricted_low", "restricted_high", "seed", "primer_path", "primer_init", "val_limit",
           "keep_best", "best_epoch", "train_seconds", "score_seconds"]
TEXT_COLUMNS = ["run_id", "script", "kind", "status", "model_id", "lr_schedule", "primer_position", "primer_path",
                "primer_init"]  # read as text: "1e-05" stays a schedule and "" stays "", not NaN


def path(results_dir: str) -> str:
    return os.path.join(results_dir, "results.csv")


def check(results_dir: str) -> None:
    """A one-line error if the ledger cannot take a row: so a damaged file is found before the work, not after."""
    ledger = path(results_dir)
    if not os.path.exists(ledger):
        return
    fix = f"fix that line or move the file aside (mv {ledger} {ledger}.old)"
    with open(ledger, "rb") as f:
        lines = f.read().split(b"\n")
    for number, line in enumerate(lines, 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            raise cli.UserError(f"{ledger} line {number} has bytes that are not UTF-8: {fix}") from None
    with open(ledger, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is not None and header != COLUMNS:
            raise cli.UserError(f"{ledger} has other columns than this version writes: move it aside (mv {ledger} {ledger}.old)")
        for row in reader:
            if len(row) != len(COLUMNS):
                raise cli.UserError(f"{ledger} line {reader.line_num} has {len(row)} fields, not {len(COLUMNS)}: {fix}")
    if lines[-1]:
        raise cli.UserError(f"{ledger} line {len(lines)} is cut short (no line end): {fix}")


def append(results_dir: str, row: dict) -> None:
    """Add one row at the end under an exclusive lock, so runs that finish together all keep theirs; rows already
    there are never rewritten."""
    os.makedirs(results_dir, exist_ok=True)
    with open(path(results_dir), "a", encoding="utf-8", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        writer = csv.writer(f, lineterminator="\n")
        if os.fstat(f.fileno()).st_size == 0:
            writer.writerow(COLUMNS)
        writer.writerow(["" if row.get(c) is None else row[c] for c in COLUMNS])
        f.flush()
        os.fsync(f.fileno())
        fcntl.flock(f, fcntl.LOCK_UN)


def rows(results_dir: str) -> list[dict]:
    """Every ledger row, in order."""
    if not os.path.exists(path(results_dir)):
        return []
    return pd.read_csv(path(results_dir), dtype={c: str for c in TEXT_COLUMNS}, keep_default_na=False).to_dict("records")


def format_score(row: dict, name: str) -> str:
    """Score `name` ("score" or "restricted") of a metrics row as a percentage with its 95% Wilson interval's
    half-width in points, e.g. "95.9% ±0.2" (the interval is asymmetric: its bounds are in the ledger)."""
    share = row["score"] if name == "score" else row["restricted_score"]
    return f"{100 * share:.1f}% ±{50 * (row[name + '_high'] - row[name + '_low']):.1f}"


def format_table(rows: list[dict]) -> str:
    """Ledger rows in the reference's form: Samples | Tokens | LR Schedule | Score | Correct / Total, plus the run,
    what kind of run it was, the primer's position, the label-restricted score, the research knobs and the status."""
    lines = ["| Run | Kind | Samples | Tokens | Position | LR Schedule | Score | Correct / Total | Label-restricted "
             "| Primer init | Val reviews | Best epoch | Keep best | Status |", "|---" * 14 + "|"]
    for r in rows:
        samples = f"{int(r['samples']):,}" if r["samples"] else "–"
        best = "–" if pd.isna(r["best_epoch"]) else int(r["best_epoch"])
        lines.append(f"| {r['run_id']} | {r['kind']} | {samples} | {int(r['tokens'])} | {r['primer_position'] or '–'} "
                     f"| {r['lr_schedule'] or '–'} | {format_score(r, 'score')} "
                     f"| {int(r['correct']):,} / {int(r['total']):,} | {format_score(r, 'restricted')} "
                     f"| {r['primer_init'] or '–'} | {int(r['val_limit']) or '–'} | {best} "
                     f"| {'yes' if r['keep_best'] else '–'} | {r['status']} |")
    return "\n".join(lines)
