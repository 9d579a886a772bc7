"""Trained parameters beside the frozen weights, for tune.py: peft's LoRA, IA3 and LayerNorm tuning, and a prefix of
per-layer keys and values (prefix tuning, P-tuning v2). Each leaves the model as it was at the start: LoRA's B and
IA3's scales start at zero and one, LayerNorm tuning starts at the model's own norms, and the prefix starts as the
keys and values the model itself gives PREFIX_LENGTH random tokens."""
import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from harness import errors, files, parallel, primers
from harness.task import Task

PEFT_METHODS = ("lora", "ia3", "layernorm")  # wrapped by peft; saved as a peft adapter folder


@dataclass(frozen=True)
class Lora:
    """A LoRA adapter's shape: tune.py's and bake.py's LORA_RANK, LORA_ALPHA and LORA_TARGETS."""
    rank: int
    alpha: int  # updates are scaled by alpha / rank
    targets: list[str]  # the modules that get an update

    def config(self):
        """peft's LoraConfig: B starts at zero, so the wrapped model starts as the frozen one; no dropout."""
        from peft import LoraConfig
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=self.targets, lora_dropout=0.0)


def peft_config(method: str, lora: Lora):
    """peft's config for `method` (one of PEFT_METHODS); `lora` gives "lora" its shape."""
    from peft import IA3Config, LNTuningConfig
    if method == "lora":
        return lora.config()
    if method == "ia3":  # peft's defaults for Llama: keys, values and the MLP's input to down_proj are rescaled
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    # every RMSNorm's weight
    return LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm", "norm"])


def with_peft(task: Task, config, setting: str) -> torch.nn.Module:
    """The frozen model wrapped by peft with `config`, in eval mode (only the adapter's parameters require gradients);
    a one-line error naming `setting` (the setting that chose the modules) when the model has none of them."""
    from peft import get_peft_model
    try:
        with quiet_peft():
            return get_peft_model(task.model, config).eval()
    except ValueError as e:  # peft: target modules not found in the base model
        names = sorted({name.rsplit(".", 1)[-1] for name, m in task.model.named_modules()
                        if isinstance(m, torch.nn.Linear)})
        raise errors.UserError(f"{setting} names none of this model's modules ({str(e).splitlines()[0][:80]}); "
                               f"its linear layers are {', '.join(names)}") from e


@contextlib.contextmanager
def quiet_peft():
    """Without two warnings peft prints as it wraps a model, neither of them about this code: peft 0.21 reads the
    model's `is_gradient_checkpointing`, which transformers 5 deprecates, and its LayerNorm tuning calls an RMSNorm
    "unsupported" though it trains it (tests/test_tune.py checks that it learns and that its saved adapter scores the
    same)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`is_gradient_checkpointing` is deprecated", FutureWarning)
        warnings.filterwarnings("ignore", r"Unsupported layer type '<class '[\w.]+RMSNorm'>' encountered", UserWarning)
        yield


def load_peft(task: Task, path: str) -> torch.nn.Module:
    from peft import PeftModel
    try:
        with quiet_peft():
            return PeftModel.from_pretrained(task.model, path).eval()
    except (RuntimeError, ValueError, KeyError) as e:  # shapes or module names of another model
        raise errors.UserError(f"--adapter_path={path} does not fit --model_id={task.cfg.MODEL_ID} "
                               f"({type(e).__name__}): use an adapter trained on this model") from e


class Prefixed:
    """The frozen model with a trained prefix of `length` keys and values in every layer's attention, before
    everything (bos included): every position attends to them, and the real tokens take positions `length`
    onwards, as after `length` real tokens (as peft's prefix tuning does). The rest is the model's (frozen.forward,
    scoring and training run on it unchanged)."""

    def __init__(self, model: torch.nn.Module, prefix: torch.Tensor):
        self.model, self.prefix = model, prefix  # prefix: float32 [layers, 2 (key, value), kv heads, length, head dim]

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def get_decoder(self):
        return _PrefixedDecoder(self.model.get_decoder(), self.prefix)


class _PrefixedDecoder:
    def __init__(self, decoder: torch.nn.Module, prefix: torch.Tensor):
        self.decoder, self.prefix, self.layers = decoder, prefix, decoder.layers

    def __call__(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 use_cache=False):
        from transformers import DynamicCache
        rows, length = len(inputs_embeds), self.prefix.shape[3]
        cache = DynamicCache(config=self.decoder.config)
        for layer, (keys, values) in enumerate(self.prefix.to(inputs_embeds.dtype)):
            cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), layer)
        # every query sees the prefix's keys: ones before the keys of forward's 2D or 4D mask
        mask = torch.cat([attention_mask.new_ones(*attention_mask.shape[:-1], length), attention_mask], dim=-1)
        return self.decoder(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids + length,
                            cache=cache, use_cache=True)


@torch.no_grad()
def initial_prefix(task: Task, length: int, seed: int) -> torch.Tensor:
    """The keys and values [layers, 2, kv heads, length, head dim] the frozen model gives `length` seeded random
    ordinary tokens at positions 0 onwards: the prefix starts where real tokens' would be, at their scale."""
    ordinary = primers.ordinary_tokens(task.tokenizer)
    ids = ordinary[torch.randperm(len(ordinary), generator=torch.Generator().manual_seed(seed))[:length]]
    cache = task.model.get_decoder()(input_ids=ids[None].to(task.device), use_cache=True).cache
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]).float()


@parallel.main_writes
def save_tensors(run_dir: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """A prefix's or a LoReFT's tensors, with what re-scoring them needs (METHOD, its sizes) as metadata."""
    with files.atomic_path(os.path.join(run_dir, "adapter.safetensors")) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={k: str(v) for k, v in meta.items()})


def load_tensors(path: str, method: str) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        with safe_open(path, "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # not safetensors
        raise errors.UserError(f"--adapter_path={path} is not a tune.py adapter file ({type(e).__name__}): give "
                               f"results/<run id>/adapter.safetensors") from e
    if meta.get("method") != method:
        raise errors.UserError(f"--adapter_path={path} holds a {meta.get('method')} adapter, not {method}: "
                               f"set --method={meta.get('method')}")
    return tensors, meta


def check_prefix(task: Task, prefix: torch.Tensor, path: Optional[str] = None) -> None:
    config = task.model.config
    width = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    expected = (config.num_hidden_layers, 2, config.num_key_value_heads, width)
    if tuple(prefix.shape[:3]) + prefix.shape[4:] != expected:
        raise errors.UserError(f"--adapter_path={path} holds a prefix of shape {tuple(prefix.shape)}, not "
                               f"[layers, 2, kv heads, length, head dim] = {expected[:3] + ('length',) + expected[3:]} "
                               f"of this model: use one trained on --model_id")
