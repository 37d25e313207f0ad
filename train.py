#!/usr/bin/env python3
"""Train a BagNet-style model with the certified-robustness loss: ``bagcert train`` run from a checkout.

The options and examples: ``python train.py --help``; the code: ``bagcert/cli/train.py``.
"""

import sys

from bagcert.cli.train import build_parser, main, resolve_config  # noqa: F401  (tests and scripts import them from here)

if __name__ == "__main__":
    sys.exit(main())
