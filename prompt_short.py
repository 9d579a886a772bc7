"""Baseline: a short hand-written prompt (about 35 tokens), scored on the test split."""
from harness import cli, runs

SYSTEM = "Classify the given text as either negative (`1`) or positive (`2`). Write nothing else."
USER = "```\n{review}\n```\n\n# Classification"

SHOTS = 0  # training reviews with their labels put before the review as earlier turns (seeded, label-balanced)
CALIBRATE = False  # label probabilities divided by those of content-free inputs (Zhao et al. 2021), label-restricted

if __name__ == "__main__":
    cli.main(lambda cfg: runs.score_text_prompt(cfg, "prompt_short", SYSTEM, USER, cfg.SHOTS, cfg.CALIBRATE),
             {"SHOTS": SHOTS, "CALIBRATE": CALIBRATE})
