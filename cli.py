"""Plumbing shared by every script: config overrides, one-line errors, atomic writes."""
import ast
import contextlib
import difflib
import os
import sys
import types
from typing import Any, Callable, Iterator, Optional

import torch

import config
import parallel


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
    """config.py's constants, plus a script's own `extra` ones, with the --name=value overrides of argv applied."""
    base = {**defaults(), **(extra or {})}
    cfg = dict(base)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"cannot read argument {arg!r}: write overrides as --name=value, e.g. --batch_size=8")
        key, text = arg[2:].split("=", 1)
        name = key.upper()
        if name not in cfg:
            close = difflib.get_close_matches(key.lower(), [k.lower() for k in cfg], n=1, cutoff=0.0)
            raise UserError(f"unknown config key --{key}: did you mean --{close[0]}? (keys are config.py's constants, in lowercase)")
        cfg[name] = check_type(name, parse_value(text), base[name])
    return types.SimpleNamespace(**cfg)


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


def gguf_source(model_id: str, gguf_file: Optional[str]) -> tuple[str, dict]:
    """The folder or hub id to load from and the from_pretrained keywords that name its GGUF file, if any: a model_id
    ending in .gguf is that file (transformers reads GGUF only through a folder plus a file name)."""
    if model_id.endswith(".gguf"):
        folder, gguf_file = os.path.split(model_id)
        return folder or ".", {"gguf_file": gguf_file}
    return model_id, {"gguf_file": gguf_file} if gguf_file else {}


def from_hub(load: Callable, model_id: str, gguf_file: Optional[str] = None, **kwargs) -> Any:
    """load(model_id) with a one-line answer when the id is wrong, gated or unreachable; GGUF as gguf_source says."""
    source, gguf = gguf_source(model_id, gguf_file)
    try:
        return load(source, **gguf, **kwargs)
    except OSError as e:
        raise UserError(f"cannot load {model_id!r} ({str(e).splitlines()[0][:200]}): check --model_id; for a gated "
                        f"model accept its license on huggingface.co and run `hf auth login`, or set --model_id to an ungated model (e.g. Qwen/Qwen2.5-0.5B-Instruct) or a local folder") from e
