"""Baseline: a long hand-written prompt (about 80 tokens) with two worked examples, scored on the test split."""
from harness import cli, runs

SYSTEM = """Classify the given text as either negative (`1`) or positive (`2`). Write nothing else, only the digit.

# Examples
Text: Worst sandwich ever!
Output: 1

Text: I love this bar!
Output: 2"""
USER = "# Your task\n```\n{review}\n```\n\n# Output"

SHOTS = 0  # training reviews with their labels put before the review as earlier turns (seeded, label-balanced)
CALIBRATE = False  # label probabilities divided by those of content-free inputs (Zhao et al. 2021), label-restricted

if __name__ == "__main__":
    cli.main(lambda cfg: runs.score_text_prompt(cfg, "prompt_long", SYSTEM, USER, cfg.SHOTS, cfg.CALIBRATE),
             {"SHOTS": SHOTS, "CALIBRATE": CALIBRATE})
