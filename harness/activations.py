"""The frozen model's hidden states per review, layer by layer: extracted in batches, kept as float16 safetensors."""
import glob
import hashlib
import json
import os
import shutil
import time
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harness import batches, files, frozen, parallel
from harness.data import Split
from harness.layouts import Layout, assemble
from harness.task import Task

POOLINGS = ("last", "mean")  # the hidden state where the answer is predicted, and the mean over the review's tokens


def layer_count(model: torch.nn.Module) -> int:
    """Hidden states a model has: the embeddings (layer 0) and each decoder layer's output."""
    return len(model.get_decoder().layers) + 1


@torch.inference_mode()
def extract(task: Task, layout: Layout, split: Split, layers: tuple[int, ...], poolings: tuple[str, ...] = POOLINGS,
            primer: Optional[torch.Tensor] = None, desc: str = "features") -> dict[str, torch.Tensor]:
    """{pooling: float32 [len(layers), len(split), hidden]}: each review's hidden states in layout, in split's order.
    Batched longest first and sharded across processes under accelerate (batches.longest_first)."""
    width = task.model.get_input_embeddings().weight.shape[1]
    found = {p: torch.zeros(len(layers), len(split), width, device=task.device) for p in poolings}
    for idx in batches.longest_first(task, split, desc):
        ids, lengths, joins = assemble(layout, split, idx, with_joins=True)
        out = frozen.forward(task.model, ids, lengths, layout, primer, layers=layers, joins=joins)
        for pooling in poolings:
            found[pooling][:, idx.to(task.device)] = torch.stack([getattr(out, pooling)[layer] for layer in layers])
    return {p: parallel.sum_across(f).cpu() for p, f in found.items()}


def _fingerprint(task: Task, layout: Layout, split: Split, layers: tuple[int, ...], poolings: tuple[str, ...],
                primer: Optional[torch.Tensor]) -> str:
    """What a split's features depend on: the model, its dtype, the exact input ids around each review, the primer,
    the layers and poolings."""
    cfg, digest = task.cfg, hashlib.sha256()
    settings = {"model_id": cfg.MODEL_ID, "gguf_file": cfg.GGUF_FILE,
                "dtype": str(next(task.model.parameters()).dtype), "prefix": layout.prefix.tolist(),
                "suffix": layout.suffix.tolist(), "slot": [layout.slot.start, layout.slot.stop],
                "in_suffix": layout.in_suffix, "joins": layout.joins, "layers": list(layers),
                "poolings": list(poolings), "mean": "review tokens only"}  # older features pooled the joined text too
    digest.update(json.dumps(settings).encode())
    for tensor in (split.tokens, split.offsets, split.labels) + (() if primer is None else (primer.float().cpu(),)):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def features(task: Task, layout: Layout, split: Split, layers: tuple[int, ...], poolings: tuple[str, ...],
             run_dir: str, name: str, primer: Optional[torch.Tensor] = None) -> tuple[dict[str, torch.Tensor], float]:
    """extract()'s features of split (as float32) and the seconds they took, kept as
    run_dir/features-<name>.safetensors (float16, with the reviews' labels, and their fingerprint in the metadata).
    Features of the same fingerprint in another run folder of RESULTS_DIR are reused instead of extracted again
    (0 seconds)."""
    key = _fingerprint(task, layout, split, layers, poolings, primer)
    path = os.path.join(run_dir, f"features-{name}.safetensors")
    earlier = next((p for p in sorted(glob.glob(os.path.join(task.cfg.RESULTS_DIR, "*", "features-*.safetensors")))
                    if _saved_fingerprint(p) == key), None)
    if earlier is not None:
        if parallel.is_main() and os.path.abspath(earlier) != os.path.abspath(path):
            try:
                os.link(earlier, path)  # the same bytes twice on disk for nothing: a hard link where it can be
            except OSError:
                shutil.copyfile(earlier, path)
        print(f"{name} features: reusing {earlier}", flush=True)
        return {p: f.float() for p, f in load_file(earlier).items() if p in poolings}, 0.0
    start = time.perf_counter()
    found = extract(task, layout, split, layers, poolings, primer, desc=f"{name} features")
    seconds = time.perf_counter() - start
    if parallel.is_main():
        with files.atomic_path(path) as tmp:
            save_file({**{p: f.half().contiguous() for p, f in found.items()}, "labels": split.labels}, tmp,
                      metadata={"fingerprint": key, "model_id": task.cfg.MODEL_ID, "layers": json.dumps(list(layers)),
                                "reviews": str(len(split))})
    return {p: f.half().float() for p, f in found.items()}, seconds


def _saved_fingerprint(path: str) -> Optional[str]:
    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("fingerprint")
    except Exception:  # a damaged or foreign file is never reused
        return None
