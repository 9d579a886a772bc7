"""The harness every script at the root shares: loading, data, layouts, the frozen forward, training, scoring, runs
and the ledger."""
