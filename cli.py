"""Plumbing shared by every script: config overrides, one-line errors, atomic writes."""
import ast
import contextlib
import difflib
import json
import os
import sys
import types
from typing import Any, Callable, Iterator, Optional

import torch

import config
import parallel


# settings that cannot change a run's result, so a resumed run may take new values for them
RESUMABLE = {"DEVICE", "SCORE_BATCH_SIZE", "CHECKPOINT_EVERY", "GRADIENT_CHECKPOINTING", "RESULTS_DIR", "DATA_DIR"}


class UserError(Exception):
    """A mistake the user can fix; printed as one line, never as a traceback."""


def defaults() -> dict[str, Any]:
    return {k: v for k, v in vars(config).items() if k.isupper()}


def parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_type(name: str, value: Any, default: Any) -> Any:
    """The value if it fits the default's type (int for float, str for None), else a UserError."""
    if default is None:
        if value is None or isinstance(value, str):
            return value
        expected = "a path string or None"
    elif isinstance(default, bool):
        if isinstance(value, bool):
            return value
        expected = "True or False"
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        expected = "a number"
    elif isinstance(default, list):
        if isinstance(value, (list, tuple)) and value:
            return [check_type(name, v, default[0]) for v in value] if default else list(value)
        expected = "a non-empty list like " + repr(default)
    elif isinstance(value, type(default)) and not isinstance(value, bool):
        return value
    else:
        expected = type(default).__name__
    raise UserError(f"--{name.lower()}={value!r} has the wrong type: expected {expected}, as in config.py's {name} = {default!r}")


def configure(argv: list[str], extra: Optional[dict[str, Any]] = None) -> types.SimpleNamespace:
    """config.py's constants, plus a script's own `extra` ones, with the --name=value overrides of argv applied.
    With --resume=<run folder> the base is that run's config, and only RESUMABLE keys may be overridden."""
    base = {**defaults(), **(extra or {})}
    given = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"cannot read argument {arg!r}: write overrides as --name=value, e.g. --batch_size=8")
        key, text = arg[2:].split("=", 1)
        name = key.upper()
        if name not in base:
            close = difflib.get_close_matches(key.lower(), [k.lower() for k in base], n=1, cutoff=0.0)
            raise UserError(f"unknown config key --{key}: did you mean --{close[0]}? (keys are config.py's constants, in lowercase)")
        given[name] = check_type(name, parse_value(text), base[name])
    if given.get("RESUME"):
        fixed = sorted(set(given) - RESUMABLE - {"RESUME"})
        if fixed:
            raise UserError(f"a resumed run keeps its config: {', '.join('--' + k.lower() for k in fixed)} cannot change "
                            f"on --resume (only {', '.join('--' + k.lower() for k in sorted(RESUMABLE))} can); start a new run instead")
        base = {**base, **saved_config(given["RESUME"], base)}
    return types.SimpleNamespace(**{**base, **given})


def saved_config(run_dir: str, base: dict[str, Any]) -> dict[str, Any]:
    """The config run_dir was started with (its config.json), less keys that `base` no longer has and RESUME."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} is not a run folder (no config.json): give results/<run id>")
    saved = {k.upper(): v for k, v in read_json(path).items() if k.upper() in base and k != "resume"}
    return {k: check_type(k, v, base[k]) for k, v in saved.items()}


def run_config(run_dir: str, overrides: list[str] = ()) -> types.SimpleNamespace:
    """The config run_dir was started with, overrides on top."""
    return configure(as_args(saved_config(run_dir, defaults())) + list(overrides))


def read_json(path: str) -> dict:
    """A run folder's JSON file; a one-line error when it is damaged."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}): give the folder of a finished run") from e


def print_config(cfg: types.SimpleNamespace) -> None:
    width = max(map(len, vars(cfg)))
    print("\n".join(f"{k.lower():<{width}} = {v!r}" for k, v in vars(cfg).items()), flush=True)


def as_args(values: dict[str, Any]) -> list[str]:
    """Config values as the --name=value overrides that set them."""
    return [f"--{k.lower()}={v!r}" for k, v in values.items()]


def main(run: Callable[[types.SimpleNamespace], Any], extra: Optional[dict[str, Any]] = None,
         parse: Optional[Callable[[list[str]], types.SimpleNamespace]] = None) -> None:
    """Configure from sys.argv (with `parse` when the script reads more than overrides), print the config and call
    run(cfg); joins the other processes when accelerate launched several; a UserError exits with one line."""
    try:
        cfg = parse(sys.argv[1:]) if parse else configure(sys.argv[1:], extra)
        parallel.start(cfg.DEVICE)
        print_config(cfg)
        run(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")
    except torch.OutOfMemoryError as e:
        sys.exit(f"error: {out_of_memory(cfg)} ({str(e).splitlines()[0][:120]})")
    except KeyboardInterrupt:
        sys.exit("interrupted")


def out_of_memory(cfg: types.SimpleNamespace) -> str:
    return (f"out of GPU memory: lower --batch_size={cfg.BATCH_SIZE} (training) or --score_batch_size={cfg.SCORE_BATCH_SIZE} "
            f"(scoring), lower --max_review_tokens={cfg.MAX_REVIEW_TOKENS}, or set --gradient_checkpointing=True")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path to write `path` through: renamed onto it only when the block completes, so an interrupted
    write leaves the previous file intact and never a half-written one."""
    yield path + ".tmp"
    os.replace(path + ".tmp", path)


def from_hub(load: Callable, model_id: str, **kwargs) -> Any:
    """load(model_id) with a one-line answer when the id is wrong, gated or unreachable."""
    try:
        return load(model_id, **kwargs)
    except OSError as e:
        raise UserError(f"cannot load {model_id!r} ({str(e).splitlines()[0][:200]}): check --model_id; for a gated "
                        f"model accept its license on huggingface.co and run `hf auth login`, or set --model_id to an ungated model (e.g. Qwen/Qwen2.5-0.5B-Instruct) or a local folder") from e
