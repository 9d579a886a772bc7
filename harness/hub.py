"""Loading the frozen model and its tokenizer, on the device and in the dtype asked for, from a local folder, a local
.gguf file or the Hugging Face hub, with one line that says first what is wrong when it cannot."""
import functools
import os
from typing import Any, Callable, Optional

import torch

from harness import parallel
from harness.errors import UserError

HUB_TIMEOUT = 10  # seconds to wait for huggingface.co's answer before calling it unreachable
OFFLINE = "HF_HUB_OFFLINE is set"  # why the hub is not asked when the user turned it off


def resolve_device(name: str) -> torch.device:
    if parallel.started():  # each process has a device of its own, which DEVICE may name only by its type
        mine = parallel.device()
        if name not in ("auto", mine.type):
            raise UserError(f"--device={name}, but under accelerate launch this process runs on {mine}: "
                            f"use --device=auto (each process then takes its own GPU) or --device={mine.type}")
        return mine
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={name} but torch sees no CUDA GPU: use --device=cpu or --device=auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("bfloat16", "float16", "float32"):
        raise UserError(f"--dtype={name} is not one of auto, bfloat16, float16, float32")
    return getattr(torch, name)


def load_tokenizer(model_id: str, gguf_file: Optional[str] = None):
    from transformers import AutoTokenizer
    return _from_hub(AutoTokenizer.from_pretrained, model_id, gguf_file)


def load_model(model_id: str, gguf_file: Optional[str], device: torch.device, dtype: str = "auto",
               checkpointing: bool = False) -> torch.nn.Module:
    """The frozen model: eval mode, no parameter ever requires a gradient. A GGUF file is dequantized to `dtype` as it
    loads (_model_kwargs), so one command runs the same arithmetic on every machine; attention is chosen once."""
    from transformers import AutoModelForCausalLM
    model = _from_hub(AutoModelForCausalLM.from_pretrained, model_id, gguf_file, dtype=resolve_dtype(dtype, device),
                      attn_implementation="sdpa", **_model_kwargs(model_id, gguf_file))
    choose_attention(device)
    return freeze(model.to(device), checkpointing)


def choose_attention(device: torch.device, cudnn: bool = False) -> None:
    """Take cuDNN out of SDPA's choices on CUDA (unless `cudnn`): with a padding mask torch picks cuDNN attention on
    Hopper, and cuDNN builds an execution plan for every new sequence length, so length-grouped batches, a new padded
    length nearly every step, ran about 10x slower than with the memory-efficient kernel, which gives the same answers
    (pytorch/pytorch#155958). Process-wide, like every torch.backends switch."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(cudnn)


def freeze(model: torch.nn.Module, checkpointing: bool) -> torch.nn.Module:
    """The model in eval mode with no parameter requiring a gradient, optionally checkpointing its layers."""
    model.requires_grad_(False).eval()
    if checkpointing:
        from transformers.modeling_layers import GradientCheckpointingLayer
        model.activation_checkpointing_enable()
        # HF checkpoints only layers in training mode: flag those alone, dropout stays off
        for layer in model.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                layer.training = True
    return model


def _gguf_source(model_id: str, gguf_file: Optional[str]) -> tuple[str, dict]:
    """The folder or hub id to load from and the from_pretrained keywords that name its GGUF file, if any: a model_id
    ending in .gguf is that file (transformers reads GGUF only through a folder plus a file name)."""
    if model_id.endswith(".gguf"):
        folder, gguf_file = os.path.split(model_id)
        return folder or ".", {"gguf_file": gguf_file}
    return model_id, {"gguf_file": gguf_file} if gguf_file else {}


def _model_kwargs(model_id: str, gguf_file: Optional[str]) -> dict:
    """from_pretrained's keywords for the model (not the tokenizer): a GGUF file is dequantized to the dtype asked for
    as it loads. Otherwise transformers 5.24 keeps a quantized GGUF's weights packed, computing every matmul in
    float32 from the blocks, wherever it finds its GGUF kernels (the `kernels` package and a kernel for the device:
    GgufHfQuantizer.validate_environment) for the architectures of its new GGUF loader (qwen35, lfm2; llama's legacy
    loader dequantizes, but warns of float32 matmuls), and dequantizes elsewhere: one command would run different
    arithmetic, at a different speed, from machine to machine. environment.json records what was loaded."""
    if not (model_id.endswith(".gguf") or gguf_file):
        return {}
    from transformers import GgufConfig
    return {"quantization_config": GgufConfig(dequantize=True)}


def packed_gguf(model) -> bool:
    """Whether any of the model's weights stayed in GGUF blocks (transformers' packed GGUF modules)."""
    from transformers.integrations.gguf.utils import GgufEmbedding, GgufExperts, GgufLinear
    return any(isinstance(m, (GgufEmbedding, GgufExperts, GgufLinear)) for m in model.modules())


def _from_hub(load: Callable, model_id: str, gguf_file: Optional[str] = None, **kwargs) -> Any:
    """load(model_id, **kwargs) of a local folder, a local .gguf file or a Hugging Face hub id (GGUF as _gguf_source
    says). When it cannot load, one line says first what is wrong (no such folder or file, no network, offline mode,
    an unknown id, a gated model) and what to do."""
    source, gguf = _gguf_source(model_id, gguf_file)
    kwargs = {**gguf, **kwargs}
    if model_id.endswith(".gguf") and not os.path.isfile(model_id):
        raise UserError(f"--model_id={model_id}: no such file (in {os.getcwd()}): give a local .gguf file, or a folder "
                        f"or hub id with --gguf_file")
    if os.path.isdir(source):
        try:
            return load(source, **kwargs)
        except (OSError, ValueError) as e:  # transformers raises either for a folder without the files it needs
            raise UserError(f"the folder --model_id={model_id} holds no model ({first_line(e)}): give a folder that "
                            f"save_pretrained wrote") from e
    if not _is_hub_id(source):
        raise UserError(f"--model_id={model_id}: no such folder (in {os.getcwd()}), nor an id of the form owner/name: "
                        f"give a local model folder or a Hugging Face id")
    unreachable = _hub_unreachable(source)
    try:
        return load(source, local_files_only=unreachable is not None, **kwargs)
    except OSError as e:
        raise UserError(_hub_failure(model_id, e, unreachable)) from e


def _is_hub_id(model_id: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return False
    return True


@functools.cache  # the tokenizer and the model come from the same place: ask once
def _hub_unreachable(model_id: str) -> Optional[str]:
    """Why the hub cannot be asked for model_id now (offline mode, no network), or None when it can. One quick request
    decides, where a download would retry for about 50 s before failing; an id the hub does not know is an error."""
    from huggingface_hub import constants, model_info
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    if constants.is_offline_mode():
        return OFFLINE
    try:
        model_info(model_id, timeout=HUB_TIMEOUT)
    except GatedRepoError:
        return None  # the hub answered; the download says whether this machine may read it
    except RepositoryNotFoundError as e:
        raise UserError(_not_on_hub(model_id)) from e
    except HfHubHTTPError:
        return None  # the hub answered; a download that fails says why
    except Exception as e:  # no answer at all (no network, DNS, proxy, timeout), in the HTTP client's own error types
        why = f"cannot reach {constants.ENDPOINT} ({type(e).__name__}: {first_line(e)})"
        print(f"{why}: looking for {model_id} in the local Hugging Face cache only (HF_HUB_OFFLINE=1 skips this "
              f"check)", flush=True)
        return why
    return None


def _hub_failure(model_id: str, error: OSError, unreachable: Optional[str]) -> str:
    """One line on why hub id model_id did not load, led by what is wrong."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    causes = []
    while error is not None:
        causes.append(error)
        error = error.__cause__ or error.__context__
    local = "set --model_id to a local model folder (python tiny.py builds a tiny one)"
    if unreachable == OFFLINE:
        return (f"{model_id} is neither a folder here nor in the local Hugging Face cache, and HF_HUB_OFFLINE is set: "
                f"unset it to download the model, or {local}")
    if unreachable:
        return (f"{unreachable}, and {model_id} is not in the local Hugging Face cache: "
                f"connect to the network, or {local}")
    if any(isinstance(e, GatedRepoError) for e in causes):
        return (f"{model_id} is gated and this machine has no access: accept its license on "
                f"https://huggingface.co/{model_id} and run `hf auth login`, or set --model_id to an ungated model "
                f"(e.g. Qwen/Qwen2.5-0.5B-Instruct) or a local folder")
    if any(isinstance(e, RepositoryNotFoundError) for e in causes):
        return _not_on_hub(model_id)
    return f"cannot load {model_id} ({first_line(causes[0])}): check --model_id"


def _not_on_hub(model_id: str) -> str:
    return (f"no folder {model_id} here and no model {model_id} on huggingface.co: check --model_id "
            f"(a private model needs `hf auth login`)")


def first_line(error: Exception) -> str:
    return (str(error).splitlines() or [""])[0][:200]
