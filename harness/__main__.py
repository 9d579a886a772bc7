"""`python -m harness`: what this package is, and the scripts to run instead."""
import sys

ABOUT = """harness: the code the scripts at the repository's root share (loading, data, prompt layouts, the frozen
forward pass, training, scoring, run folders and the results ledger). Its modules are libraries, not commands;
only harness/data.py runs alone, as ./prep.sh. Run a script from the repository root instead, e.g.

    python tiny.py                      # a tiny model and data set: checks an install in about a minute
    python real.py                      # a real small chat model and real reviews, for a CPU
    python experiment.py --help         # train and score a primer; every script takes --help
    python compare.py results/<A> results/<B>

The scripts: experiment.py, prompt_long.py, prompt_short.py, probe.py, steer.py, search_prompt.py, tune.py, bake.py,
inspect_primer.py, sweep.py, table.py, compare.py, bench.py, real.py, tiny.py (README.md says which to run when)."""


def main(module: str = "harness") -> None:
    print(f"{module} is not a script.\n\n{ABOUT}" if module != "harness" else ABOUT)
    sys.exit(0 if module == "harness" or {"-h", "--help"} & set(sys.argv[1:]) else 2)


if __name__ == "__main__":
    main()
