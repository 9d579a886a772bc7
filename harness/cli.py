"""Plumbing shared by every script: config overrides, `--help`, `--resume`'s config read back, one-line errors."""
import ast
import difflib
import functools
import io
import json
import os
import shlex
import sys
import tokenize
import types
from typing import Any, Callable, Optional

import torch

import config
from harness import parallel
from harness.errors import UserError
from harness.files import read_json

PROGRESS_SECONDS = 60  # in a log file rather than a terminal, progress bars redraw at most this often
# settings a resumed run may take new values for: where files go, checkpointing, and how the work runs. These last
# can move numbers: --score_batch_size moves logits by ~5e-5 in float32 on the CPU (answers equal) and can move answers
# in bfloat16, --threads changes the order in which a sum's parts are added, and --device=cuda turns DTYPE=auto into
# bfloat16
RESUMABLE = {"DEVICE", "SCORE_BATCH_SIZE", "CHECKPOINT_EVERY", "GRADIENT_CHECKPOINTING", "RESULTS_DIR", "DATA_DIR",
             "THREADS"}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")  # read by the
# OpenMP, BLAS and tokenizers' thread pools as they start


def defaults() -> dict[str, Any]:
    return {k: v for k, v in vars(config).items() if k.isupper()}


def _settings(extra: Optional[dict[str, Any]] = None, shared: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
    """The settings a script reads, with their defaults: config.py's (only those named in `shared` when a script
    declares it reads no others), then the script's own `extra` ones."""
    base = defaults() if shared is None else {k: v for k, v in defaults().items() if k in shared}
    return {**base, **(extra or {})}


def own_settings(namespace: dict[str, Any]) -> dict[str, Any]:
    """A script's own settings, for main(run, extra): the uppercase constants of its globals() (not imported
    modules)."""
    return {k: v for k, v in namespace.items() if k.isupper() and not isinstance(v, types.ModuleType)}


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _check_type(name: str, value: Any, default: Any) -> Any:
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
        if isinstance(value, (list, tuple)) and (value or not default):  # empty only where the default is
            return [_check_type(name, v, default[0]) for v in value] if default else list(value)
        expected = f"a non-empty list like {default!r}" if default else "a list"
    elif isinstance(value, type(default)) and not isinstance(value, bool):
        return value
    else:
        expected = type(default).__name__
    raise UserError(f"--{name.lower()}={value!r} has the wrong type: expected {expected}, "
                    f"as in config.py's {name} = {default!r}")


def configure(argv: list[str], extra: Optional[dict[str, Any]] = None,
              shared: Optional[tuple[str, ...]] = None) -> types.SimpleNamespace:
    """config.py's constants (those in `shared` alone when given), plus a script's own `extra` ones, with the
    --name=value overrides of argv applied. With --resume=<run folder> the base is that run's config, and only
    RESUMABLE keys may be overridden."""
    base = _settings(extra, shared)
    given = {}
    for i, arg in enumerate(argv):
        key, eq, text = arg[2:].partition("=")
        name = key.upper()
        if not arg.startswith("--"):
            raise UserError(f"cannot read argument {arg!r}: write overrides as --name=value, e.g. --batch_size=8")
        if name not in base:
            raise UserError(_unknown_key(key, base, shared))
        if not eq:
            follows = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value = argv[i + 1] if follows else "True" if isinstance(base[name], bool) else "<value>"
            raise UserError(f"write --{key}={value}, with '=' and no space (see --help)")
        given[name] = _check_type(name, _parse_value(text), base[name])
    if given.get("RESUME"):
        fixed = sorted(set(given) - RESUMABLE - {"RESUME"})
        if fixed:
            raise UserError(f"a resumed run keeps its config: {', '.join('--' + k.lower() for k in fixed)} "
                            f"cannot change on --resume (only {', '.join('--' + k.lower() for k in sorted(RESUMABLE))} "
                            f"can); start a new run instead")
        base = {**base, **_saved_config(given["RESUME"], base)}
    return types.SimpleNamespace(**{**base, **given})


def _unknown_key(key: str, base: dict[str, Any], shared: Optional[tuple[str, ...]]) -> str:
    script = os.path.basename(sys.argv[0]) or "this script"
    if not base:
        return f"unknown setting --{key}: {script} takes no settings (see --help)"
    if shared is None:
        close = difflib.get_close_matches(key.lower(), [k.lower() for k in base], n=1, cutoff=0.0)
        return f"unknown config key --{key}: did you mean --{close[0]}? (keys are config.py's constants, in lowercase)"
    close = difflib.get_close_matches(key.lower(), [k.lower() for k in base], n=1)
    guess = f"did you mean --{close[0]}? " if close else ""
    return f"unknown setting --{key}: {guess}({script} reads only {', '.join('--' + k.lower() for k in base)})"


def _saved_config(run_dir: str, base: dict[str, Any]) -> dict[str, Any]:
    """The config run_dir was started with (its config.json), less keys that `base` no longer has and RESUME."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} is not a run folder (no config.json): give results/<run id>")
    saved = {k.upper(): v for k, v in read_json(path).items() if k.upper() in base and k != "resume"}
    return {k: _check_type(k, v, base[k]) for k, v in saved.items()}


def run_config(run_dir: str, overrides: list[str] = ()) -> types.SimpleNamespace:
    """The config run_dir was started with, overrides on top."""
    return configure(as_args(_saved_config(run_dir, defaults())) + list(overrides))


def setting_comments(path: str) -> dict[str, str]:
    """The comment closing the line that sets each uppercase constant of a Python file (and each uppercase key of a
    module-level dict, like bench.py's BENCH): --help shows these, so config.py's comments are its documentation."""
    with open(path) as f:
        source = f.read()
    comments = {t.start[0]: t.string.lstrip("# ") for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT}
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper():
            found[node.targets[0].id] = comments.get(node.end_lineno, "")
            if isinstance(node.value, ast.Dict):
                found.update({k.value: comments.get(v.end_lineno, "")
                              for k, v in zip(node.value.keys, node.value.values)
                              if isinstance(k, ast.Constant) and str(k.value).isupper()})
    return found


def usage(script: types.ModuleType, extra: Optional[dict[str, Any]] = None,
          shared: Optional[tuple[str, ...]] = None) -> str:
    """--help: the script's docstring, then every setting it reads with its default and its comment."""
    notes = {**setting_comments(config.__file__), **(setting_comments(script.__file__) if extra else {})}
    values = _settings(extra, shared)
    sources = ((["config.py"] if shared is None or shared else [])
               + ([os.path.basename(script.__file__)] if extra else []))
    lines = [(script.__doc__ or "").strip(), ""]
    if not values:
        return "\n".join(lines + ["settings: none"])
    lines.append("settings: override any as --name=value (a Python literal of the default's type); defaults from "
                 + " and ".join(sources))
    for name, value in values.items():
        lines += [f"  --{name.lower()}={value!r}", f"        {notes.get(name, '')}"]
    return "\n".join(lines)


def _print_config(cfg: types.SimpleNamespace) -> None:
    if not vars(cfg):
        return
    width = max(map(len, vars(cfg)))
    print("\n".join(f"{k.lower():<{width}} = {v!r}" for k, v in vars(cfg).items()), flush=True)


def as_args(values: dict[str, Any]) -> list[str]:
    """Config values as the --name=value overrides that set them."""
    return [f"--{k.lower()}={v!r}" for k, v in values.items()]


def shell_args(values: dict[str, Any]) -> str:
    """Config values as overrides to paste into a shell: a value written plainly where it reads back as itself."""
    return " ".join(shlex.quote(f"--{k.lower()}={v if _parse_value(str(v)) == v else repr(v)}")
                    for k, v in values.items())


def main(run: Callable[[types.SimpleNamespace], Any], extra: Optional[dict[str, Any]] = None,
         parse: Optional[Callable[[list[str]], types.SimpleNamespace]] = None,
         shared: Optional[tuple[str, ...]] = None) -> None:
    """Configure from sys.argv (with `parse` when the script reads more than overrides), print the config and call
    run(cfg); joins the other processes when accelerate launched several, and leaves their group when done (after
    waiting for them, unless this process crashed alone); a UserError exits with one line.
    -h or --help prints usage() instead. A script that reads few of config.py's settings names them in `shared`
    (() for none): it then shows and accepts only those and its own `extra` ones."""
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(usage(sys.modules["__main__"], extra, shared))
        return
    if "--help=json" in sys.argv[1:]:
        print(_settings_json(extra))
        return
    quiet_progress_bars()
    alike = True  # whether every process ends as this one does, so that it may wait for the others
    try:
        cfg = parse(sys.argv[1:]) if parse else configure(sys.argv[1:], extra, shared)
        parallel.start(getattr(cfg, "DEVICE", "cpu"))
        use_threads(cfg)
        _print_config(cfg)
        if hasattr(cfg, "THREADS"):
            print(f"threads: {torch.get_num_threads()} of {os.cpu_count()} cores (--threads)", flush=True)
        run(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")
    except torch.OutOfMemoryError as e:
        alike = False  # this process's memory, not the others'
        sys.exit(f"error: {_out_of_memory(cfg)} ({str(e).splitlines()[0][:120]})")
    except KeyboardInterrupt:
        sys.exit("interrupted")
    except Exception:
        alike = False
        raise
    finally:
        parallel.stop(wait=alike)


def use_threads(cfg: types.SimpleNamespace) -> None:
    """Hold this process to THREADS compute threads (where a script reads it and it is not 0): torch's, the BLAS and
    OpenMP pools loaded already (numpy's, torch's), and through their variables those that start later
    (scikit-learn's, the tokenizers'). Each library's default is one thread per core, which other jobs on the machine
    slow down many times over."""
    threads = getattr(cfg, "THREADS", 0)
    if threads < 0:
        raise UserError(f"--threads={threads} must be 0 (each library's default) or a number of threads")
    if not threads:
        return
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency
    torch.set_num_threads(threads)
    threadpool_limits(threads)
    os.environ.update({name: str(threads) for name in THREAD_VARIABLES})


def _settings_json(extra: Optional[dict[str, Any]] = None) -> str:
    """--help=json: every setting a script reads with its default, as JSON with config.json's lowercase keys, so a
    sweep learns a script's own settings by running it, never by importing it."""
    return json.dumps({k.lower(): v for k, v in {**defaults(), **(extra or {})}.items()})


def _out_of_memory(cfg: types.SimpleNamespace) -> str:
    return (f"out of GPU memory: lower --batch_size={cfg.BATCH_SIZE} (training) or "
            f"--score_batch_size={cfg.SCORE_BATCH_SIZE} (scoring), lower --max_review_tokens={cfg.MAX_REVIEW_TOKENS}, "
            f"or set --gradient_checkpointing=True")


def quiet_progress_bars() -> None:
    """When stderr is not a terminal (a log file, a pipe), a progress bar redraws at most every PROGRESS_SECONDS and
    on closing, so a redirected log keeps one line per bar instead of one per update; a terminal keeps live bars.
    Done as tqdm's own TQDM_* environment variables do it (they are read only when tqdm is imported, too early here)."""
    from tqdm import std
    if not sys.stderr.isatty() and not getattr(std.tqdm, "_quiet", False):
        std.tqdm.__init__ = functools.partialmethod(std.tqdm.__init__, mininterval=PROGRESS_SECONDS, miniters=0)
        std.tqdm.set_postfix = functools.partialmethod(std.tqdm.set_postfix, refresh=False)  # shown at the next redraw
        std.tqdm._quiet = True
