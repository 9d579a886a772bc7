"""Writes that never leave half a file, folders checked before anything is written in them, and reads of a run
folder's JSON that fail in one line."""
import contextlib
import json
import os
from typing import Iterator

from harness import parallel
from harness.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path to write `path` through: renamed onto it only when the block completes, so an interrupted
    write leaves the previous file intact and never a half-written one."""
    yield path + ".tmp"
    os.replace(path + ".tmp", path)


def write_atomic(path: str, text: str) -> None:
    """Write text to path atomically; under accelerate the main process alone writes (the others' text is the same)."""
    if not parallel.is_main():
        return
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def read_json(path: str) -> dict:
    """A run folder's JSON file; a one-line error when it is damaged."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}): give the folder of a finished run") from e


def folder(path: str, setting: str, write: bool = True) -> str:
    """path as a folder (made when absent, with write), or a one-line error naming the setting: a file where the folder
    or one of its parents should be, or a folder this user cannot write in."""
    fix = f"set {setting} to a folder you can write in" if write else f"set {setting} to a folder"
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{setting}={path} is a file, not a folder: {fix}")
    if not write:
        return path
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{setting}={path} cannot be made: part of that path is a file, not a folder; {fix}") from None
    except PermissionError:
        raise UserError(f"{setting}={path} cannot be made: no permission to write there; {fix}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{setting}={path} is not writable by this user: {fix}")
    return path
