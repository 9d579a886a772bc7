"""How long and how fast a run trains, and what it keeps: the Schedule that training.train takes (peak rate, warmup,
cosine decay, clipping, validation every N steps, early stopping, keep-best, or the reference's per-epoch rates)."""
import math
from dataclasses import dataclass, replace

from harness import errors

DECAYS = ("cosine", "constant")  # the values DECAY may take
RATE_SCALES = ("embedding", "absolute")  # the values RATE_SCALE may take (see primers.rate_unit)
FLOOR = 0.1  # a cosine decay ends at this share of the peak rate (nanoGPT's min_lr)


@dataclass(frozen=True)
class Schedule:
    """How long and how fast the loop trains, and what it keeps: built once per run (Schedule.of) and passed on,
    as minGPT's Trainer takes its own config. Rates are Adam's own (the config's times its RATE_SCALE unit)."""
    rate: float  # peak learning rate, reached after the warmup
    epochs: int = 1  # the budget: passes over the training reviews
    warmup: float = 0.0  # share of the budget over which the rate rises linearly to `rate`
    decay: str = "constant"  # "cosine": down to FLOOR x rate at the budget's end; "constant": stays at `rate`
    clip: float = 0.0  # the gradients' total norm is clipped to this before each step; 0: never
    eval_every: int = 0  # steps between validations; 0: at each epoch's end (and always at the budget's end)
    patience: int = 0  # stop once this many validations in a row have not beaten the best; 0: never
    keep_best: bool = False  # end with the tensors of the best validation rather than the last
    rate_by_epoch: tuple[float, ...] = ()  # the reference's schedule instead: one constant rate per epoch
    batch_size: int = 6
    seed: int = 0  # the batch order of epoch e is seeded with seed + e
    checkpoint_every: int = 500  # steps between checkpoints (one is also saved at each epoch's end)

    @classmethod
    def of(cls, cfg, unit: float = 1.0) -> "Schedule":
        """The run's schedule from config.py's settings, rates in absolute terms (`unit` per rate of the config)."""
        if cfg.DECAY not in DECAYS:
            raise errors.UserError(f"--decay={cfg.DECAY!r} is not one of {', '.join(DECAYS)}")
        if not 0 <= cfg.WARMUP_SHARE < 1:
            raise errors.UserError(f"--warmup_share={cfg.WARMUP_SHARE} must be a share of the budget: "
                                   f"at least 0, below 1")
        reference = bool(cfg.RATE_BY_EPOCH)  # the reference clipped nothing and stopped nothing early
        return cls(cfg.RATE * unit, cfg.EPOCHS, cfg.WARMUP_SHARE, cfg.DECAY, 0.0 if reference else cfg.CLIP_NORM,
                   cfg.EVAL_EVERY, 0 if reference else cfg.PATIENCE, cfg.KEEP_BEST,
                   tuple(rate * unit for rate in cfg.RATE_BY_EPOCH), cfg.BATCH_SIZE, cfg.SEED, cfg.CHECKPOINT_EVERY)

    def at(self, rate, unit: float = 1.0) -> "Schedule":
        """This schedule at another rate of a grid: a peak rate, or a list of per-epoch rates (the reference's)."""
        if isinstance(rate, (list, tuple)):
            return replace(self, rate_by_epoch=tuple(r * unit for r in rate), clip=0.0, patience=0)
        return replace(self, rate=rate * unit, rate_by_epoch=())

    def total_steps(self, per_epoch: int) -> int:
        return (len(self.rate_by_epoch) or self.epochs) * per_epoch

    def rates(self, per_epoch: int) -> list[float]:
        """Adam's learning rate at each step of the budget, total_steps(per_epoch) of them."""
        return [self._rate_at(step, per_epoch) for step in range(self.total_steps(per_epoch))]

    def validation_steps(self, per_epoch: int) -> list[int]:
        """The step counts after which validation is due: every eval_every steps (each epoch's end when 0) and the
        budget's end."""
        every, total = self.eval_every or per_epoch, self.total_steps(per_epoch)
        return [*range(every, total, every), total]

    def _rate_at(self, step: int, per_epoch: int) -> float:
        if self.rate_by_epoch:
            return self.rate_by_epoch[step // per_epoch]
        total = self.total_steps(per_epoch)
        warm = round(self.warmup * total)
        if step < warm:
            return self.rate * (step + 1) / warm
        if self.decay == "constant":
            return self.rate
        done = (step - warm) / max(1, total - 1 - warm)
        return self.rate * (FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * done)))
