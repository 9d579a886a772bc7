"""The text prompts a user edits at the top of prompt_long.py and prompt_short.py (read, never imported), and the
one way a prompt's name becomes the layout around a review."""
import ast
import os
from typing import Optional

import torch

from harness import primers
from harness.errors import UserError
from harness.layouts import Layout, make_layout
from harness.task import Task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_PROMPTS = ("short", "long")  # prompt_short.py and prompt_long.py
NAMES = "none, short, long, text:<words> or primer"  # what a prompt setting may be


def text_prompt(name: str) -> tuple[str, str]:
    """(SYSTEM, USER) as assigned at the top of prompt_<name>.py: the script is parsed, not run."""
    path = os.path.join(ROOT, f"prompt_{name}.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = {node.targets[0].id: node.value for node in tree.body
             if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    try:
        return ast.literal_eval(found["SYSTEM"]), ast.literal_eval(found["USER"])
    except (KeyError, ValueError) as e:
        raise UserError(f"{path} must set SYSTEM and USER to plain strings at its top ({type(e).__name__}: {e})") from e


def check_name(setting: str, name: str, primer_path: Optional[str]) -> None:
    """A one-line error, before any loading, for a prompt name layout_of cannot turn into a layout."""
    if name not in ("none", "primer", *TEXT_PROMPTS) and not name.startswith("text:"):
        raise UserError(f"--{setting}={name!r} is not one of {NAMES}")
    if name == "primer" and not primer_path:
        raise UserError(f"--{setting}=primer needs --primer_path=results/<run id>/primer.safetensors")


def layout_of(task: Task, name: str, primer_path: Optional[str] = None,
              position: str = "system") -> tuple[Layout, Optional[torch.Tensor]]:
    """The layout of a prompt named `name` (one of NAMES) and its primer (None but for "primer", read from
    primer_path and placed at `position`)."""
    if name == "primer":
        primer = primers.load_primer(primer_path, task.model, position)
        return make_layout(task, None, primer_length=len(primer), position=position), primer
    if name == "none":
        return make_layout(task, None), None
    if name.startswith("text:"):
        return make_layout(task, name[len("text:"):]), None
    return make_layout(task, *text_prompt(name)), None
