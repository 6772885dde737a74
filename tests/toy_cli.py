"""`python tests/toy_cli.py train ...`: the genlab CLI with the test-only toy family (for subprocess tests)."""

import sys

from genlab.cli import main
from genlab.registry import MODELS

MODELS.modules.append("toy_family")  # this script's folder is on sys.path

if __name__ == "__main__":
    sys.exit(main())
