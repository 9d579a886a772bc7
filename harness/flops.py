"""What a step's speed is measured against: the useful FLOPs of a batch, the device's dense matmul peak, and the
device's synchronization and peak memory (bench.py times its steps with them).

FLOPs counted per sample of T real tokens (padding is never counted):
  forward   = 2 * N * T + 2 * d * V * H + 2 * n_layers * d_attn * T^2
              N: parameters outside the embedding table and LM head; H: positions where the LM head runs (1 for us,
              T for the straightforward loop); the last term is QK^T and AV over the causal half of the score matrix.
  training  = forward + backward to the inputs only: 2 * N * T + 2 * d * V * H again (no weight gradients) and twice
              the forward attention (dQ, dK, dV and dP).
Utilization divides achieved FLOP/s by the dense matmul throughput in DTYPE that this run measures on the same device.
"""
import resource
import time

import torch


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul throughput of this device in dtype, TFLOP/s: the utilization's denominator."""
    n = 8192 if device.type == "cuda" else 1024  # on a 2-core CPU 1024 reached 188 GFLOP/s, 2048 192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(10):  # the best of several: the device's capability, not its worst moment
        sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n ** 3 / best / 1e12


def model_shape(model: torch.nn.Module) -> dict:
    conf = model.config
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied head is counted once here
    body = total - embed.numel() - (0 if head is embed else head.numel())
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
    return {"N": body, "d": conf.hidden_size, "V": embed.shape[0], "layers": conf.num_hidden_layers,
            "d_attn": conf.num_attention_heads * head_dim}


def batch_flops(shape: dict, real: torch.Tensor, head_at_every_token: bool, training: bool) -> float:
    """Useful FLOPs of one batch whose rows hold `real` tokens each (see the module docstring)."""
    real = real.double()
    head_positions = real if head_at_every_token else torch.ones_like(real)
    dense = 2 * shape["N"] * real + 2 * shape["d"] * shape["V"] * head_positions
    attention = 2 * shape["layers"] * shape["d_attn"] * real ** 2
    return float((dense * (2 if training else 1) + attention * (3 if training else 1)).sum())


def peak_memory_gb(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 1e9:.1f} GB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB RSS"
