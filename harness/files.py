"""Writes that never leave half a file, and reads of a run folder's JSON that fail in one line."""
import contextlib
import json
import os
from typing import Iterator

from harness.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path to write `path` through: renamed onto it only when the block completes, so an interrupted
    write leaves the previous file intact and never a half-written one."""
    yield path + ".tmp"
    os.replace(path + ".tmp", path)


def read_json(path: str) -> dict:
    """A run folder's JSON file; a one-line error when it is damaged."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}): give the folder of a finished run") from e
