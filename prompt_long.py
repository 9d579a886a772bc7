"""Baseline: a long hand-written prompt (about 80 tokens) with two worked examples, scored on the test split."""
from harness import cli, runs

SYSTEM = """Classify the given text as either negative (`1`) or positive (`2`). Write nothing else, only the digit.

# Examples
Text: Worst sandwich ever!
Output: 1

Text: I love this bar!
Output: 2"""
USER = "# Your task\n```\n{review}\n```\n\n# Output"

if __name__ == "__main__":
    cli.main(lambda cfg: runs.score_text_prompt(cfg, "prompt_long", SYSTEM, USER))
