"""The harness every script at the root shares: loading, data, layouts, the frozen forward, training, scoring, runs
and the ledger."""
import sys

_flags = getattr(sys, "orig_argv", [])[1:]
if "-m" in _flags and _flags.index("-m") + 1 < len(_flags):  # `python -m harness.<module>`: only data and __main__ run
    _module = _flags[_flags.index("-m") + 1]
    if _module.startswith("harness.") and _module not in ("harness.data", "harness.__main__"):
        from harness.__main__ import main
        main(_module)
