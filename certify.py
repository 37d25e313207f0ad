#!/usr/bin/env python3
"""``bagcert certify`` as a script (``python certify.py ...``, ``torchrun ... certify.py ...``): see
:mod:`bagcert.cli.certify` or ``python certify.py --help``."""

from bagcert.cli.certify import main

if __name__ == "__main__":
    raise SystemExit(main(prog="certify.py"))
