"""Kept so that ``python -m alpaca_cot.study GRID.yaml`` still runs the study, now ``alpaca_cot.eval.study``."""

import sys

from alpaca_cot.eval.study import main

if __name__ == "__main__":
    sys.exit(main())
