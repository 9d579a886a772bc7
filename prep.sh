#!/usr/bin/env bash
# Tokenize the Yelp polarity CSVs into DATA_DIR/train.pt and DATA_DIR/test.pt: ./prep.sh [--name=value ...]
set -euo pipefail
PYTHONPATH="$(dirname "$0")${PYTHONPATH:+:$PYTHONPATH}" exec python -m harness.data "$@"
