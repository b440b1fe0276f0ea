"""``python -m alpaca_cot.data``: list, download, convert, validate (see ``commands``)."""

import sys

from ..cli import run_cli
from .commands import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
