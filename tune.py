"""Train parameters beside the frozen weights on the labels, with the primer's loss (the label token's cross-entropy at
the answer position) and the shared loop: the references for what trained weights, a deeper prompt and a
representation edit reach with the same data.

    python tune.py                      # LoRA (r 8) on the attention projections
    python tune.py --method=ia3         # IA3: learned rescaling of keys, values and the MLP's down projection
    python tune.py --method=layernorm   # LayerNorm tuning: every RMSNorm's weight (Llama has no biases for BitFit)
    python tune.py --method=prefix --prefix_length=4    # prefix tuning: per-layer keys and values before everything
    python tune.py --method=loreft --reft_rank=4        # LoReFT after the review at REFT_LAYERS
    python tune.py --method=lora --adapter_path=results/<run id>/adapter   # score a saved adapter, no training
    python tune.py --resume=results/<run id>            # continue an interrupted run

The review is alone in the user turn (no prompt); every model weight stays frozen but the method's own. Validation
after each epoch with --val_limit, --keep_best, checkpoints and bitwise --resume are the shared loop's.
"""
import os

import torch

from harness import adapters, cli, errors, parallel, primers, rategrid, reft, rundir, runs, scoring, training
from harness.layouts import make_layout

METHOD = "lora"  # what is trained: "lora", "ia3", "layernorm" (peft), "prefix" (per-layer keys and values) or "loreft"
LORA_RANK = 8  # "lora": rank of each update
LORA_ALPHA = 16  # "lora": updates are scaled by LORA_ALPHA / LORA_RANK
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # "lora": the modules updated (the attention projections)
PREFIX_LENGTH = 4  # "prefix": virtual tokens, each a key and a value in every layer
REFT_RANK = 4  # "loreft": rank r of the edit at each layer
REFT_LAYERS = []  # "loreft": decoder layers (1-based) edited after the review; []: the middle one
RATE = 1e-3  # (config.py's is for primers) Adam's own peak rate
RATE_SCALE = "absolute"  # (config.py: "embedding") these parameters have no embedding scale: rates are Adam's own
ADAPTER_PATH = None  # a saved adapter (results/<run id>/adapter, or adapter.safetensors for prefix, loreft): score it
SETTINGS = cli.own_settings(dict(globals()))  # the constants above, as --name=value settings
METHODS = (*adapters.PEFT_METHODS, "prefix", "loreft")


def check(cfg) -> None:
    """One-line errors for settings that cannot work, before the model loads."""
    if cfg.METHOD not in METHODS:
        raise errors.UserError(f"--method={cfg.METHOD!r} is not one of {', '.join(METHODS)}")
    if cfg.RATE_SCALE != "absolute":
        raise errors.UserError(f"--rate_scale={cfg.RATE_SCALE!r}: tune.py's rates are Adam's own, "
                               "--rate_scale=absolute")
    for name in ("LORA_RANK", "PREFIX_LENGTH", "REFT_RANK"):
        if getattr(cfg, name) < 1:
            raise errors.UserError(f"--{name.lower()}={getattr(cfg, name)} must be at least 1")
    if cfg.ADAPTER_PATH and not os.path.exists(cfg.ADAPTER_PATH):
        raise errors.UserError(f"--adapter_path={cfg.ADAPTER_PATH} does not exist: "
                               "give a tune.py run's adapter or adapter.safetensors")


def describe(cfg, layers: tuple[int, ...] = ()) -> str:
    if cfg.METHOD == "lora":
        return f"LoRA (r{cfg.LORA_RANK}, {', '.join(cfg.LORA_TARGETS)})"
    if cfg.METHOD == "prefix":
        return f"prefix tuning ({cfg.PREFIX_LENGTH} tokens, before everything)"
    if cfg.METHOD == "loreft":
        return f"LoReFT (r{cfg.REFT_RANK}, layer {', '.join(map(str, layers))}, after the review)"
    return {"ia3": "IA3 (k_proj, v_proj, down_proj)", "layernorm": "LayerNorm tuning (every RMSNorm)"}[cfg.METHOD]


def prepare(task) -> tuple[dict[str, torch.Tensor], object, dict]:
    """The method in place: the tensors it trains (task.model wrapped where it must be), the Steer it adds (LoReFT's,
    else None) and what its adapter file records; loaded from ADAPTER_PATH when given."""
    cfg, path = task.cfg, task.cfg.ADAPTER_PATH
    if cfg.METHOD in adapters.PEFT_METHODS:
        from peft import get_peft_model_state_dict
        if path:
            task.model = adapters.load_peft(task, path)
        else:
            config = adapters.peft_config(cfg.METHOD, adapters.Lora(cfg.LORA_RANK, cfg.LORA_ALPHA, cfg.LORA_TARGETS))
            task.model = adapters.with_peft(task, config, f"--method={cfg.METHOD}")
        if path:  # a loaded adapter's parameters do not require gradients: they are those of its state
            return get_peft_model_state_dict(task.model), None, {}
        return {name: p for name, p in task.model.named_parameters() if p.requires_grad}, None, {}
    saved, meta = adapters.load_tensors(path, cfg.METHOD) if path else (None, {})
    if cfg.METHOD == "prefix":
        prefix = saved["prefix"].to(task.device) if path else adapters.initial_prefix(task, cfg.PREFIX_LENGTH, cfg.SEED)
        adapters.check_prefix(task, prefix, path)
        task.model = adapters.Prefixed(task.model, prefix)
        return {"prefix": prefix}, None, {"method": "prefix", "length": prefix.shape[3]}
    width, count = task.model.config.hidden_size, len(task.model.get_decoder().layers)
    layers = tuple(int(l) for l in meta["layers"].split(",")) if path else reft.check_layers(cfg.REFT_LAYERS, count)
    rank = int(meta["rank"]) if path else cfg.REFT_RANK
    edit = reft.LoReFT(width, rank, layers, cfg.SEED).to(task.device)
    if path:
        try:
            edit.load_state_dict(saved)
        except RuntimeError as e:
            raise errors.UserError(f"--adapter_path={path} does not fit --model_id={cfg.MODEL_ID}: "
                                   "use one trained on this model") from e
    return dict(edit.named_parameters()), edit, {"method": "loreft", "rank": rank, "layers": ",".join(map(str, layers))}


def save(task, run_dir: str, params: dict, edit, meta: dict) -> None:
    if task.cfg.METHOD in adapters.PEFT_METHODS:
        if parallel.is_main():
            task.model.save_pretrained(os.path.join(run_dir, "adapter"))  # safetensors; its folder is the ADAPTER_PATH
    else:
        adapters.save_tensors(run_dir, params if edit is None else edit.state_dict(),
                              {**meta, "model_id": task.cfg.MODEL_ID})


def run(cfg) -> None:
    check(cfg)
    task = runs.setup(cfg, with_train=not cfg.ADAPTER_PATH)
    plain = make_layout(task, None)
    params, edit, meta = prepare(task)
    steer = None if edit is None else edit.steer()
    method = describe(cfg, edit.layers if edit is not None else ())
    trainable = sum(p.numel() for p in params.values())
    if cfg.ADAPTER_PATH:
        with torch.inference_mode():
            runs.record(task, "tune", f"saved {method} ({cfg.ADAPTER_PATH})", 0,
                        scoring.predict(task, plain, steer=steer), trainable_params=trainable)
        return
    run_dir = rundir.new_or_resumed(cfg, "tune")
    evaluate = None if task.val is None else lambda: scoring.score(task, plain, split=task.val, steer=steer)
    loss = primers.loss_of(task, plain, steer=steer, trained=tuple(params.values()))
    log, status, seconds = rategrid.train_grid(task, params, loss, run_dir, training.Schedule.of(cfg), cfg.RATE_GRID,
                                               evaluate, method, "tune.py", transfer=rategrid.transfer_of(cfg))
    for p in params.values():
        p.requires_grad_(False)
    save(task, run_dir, params, edit, meta)
    runs.record(task, "tune", method, 0, scoring.predict(task, plain, steer=steer), run_dir, log, trainable, status,
                train_seconds=seconds)


if __name__ == "__main__":
    cli.main(run, SETTINGS)
