"""LoReFT (Wu et al. 2024, "ReFT: Representation Finetuning"): at chosen decoder layers, the hidden state h at the
positions after the review becomes h + R^T (W h + b - R h), R a rank-r matrix with orthonormal rows. It edits the
residual stream through frozen.Steer's hook, so it is batched and padding-exact as the steering vector is; it starts
as the identity (W = R, b = 0)."""
import torch

from harness import errors
from harness.frozen import Steer


class LoReFT(torch.nn.Module):
    """One intervention per layer: 2 r d + r parameters each (R and W are r x d, b is r)."""

    def __init__(self, width: int, rank: int, layers: tuple[int, ...], seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.layers = layers
        self.rotations, self.projections = torch.nn.ModuleList(), torch.nn.ModuleList()
        for _ in layers:
            rotation = torch.nn.Linear(width, rank, bias=False)
            torch.nn.init.orthogonal_(rotation.weight, generator=gen)
            projection = torch.nn.Linear(width, rank)
            with torch.no_grad():
                projection.weight.copy_(rotation.weight)
                projection.bias.zero_()
            self.rotations.append(torch.nn.utils.parametrizations.orthogonal(rotation))
            self.projections.append(projection)

    def edit(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The shift R^T (W h + b - R h) [B, T, hidden] at decoder layer `layer`, in float32, cast to hidden's dtype."""
        i = self.layers.index(layer)
        h = hidden.float()
        rotation = self.rotations[i]
        return ((self.projections[i](h) - rotation(h)) @ rotation.weight).to(hidden.dtype)

    def steer(self) -> Steer:
        """The intervention as a Steer: only at the positions after the review (the answer cue)."""
        return Steer(None, self.layers, 1.0, after_review=True, edit=self.edit)


def check_layers(layers: list[int], count: int) -> tuple[int, ...]:
    """REFT_LAYERS as 1-based decoder layers ([]: the middle one), checked against the model's count."""
    chosen = tuple(layers or [(count + 1) // 2])
    if not all(1 <= layer <= count for layer in chosen) or len(set(chosen)) != len(chosen):
        raise errors.UserError(f"--reft_layers={layers} must be different decoder layers 1 to {count} of this model")
    return chosen
