"""Command-line tools, each run as a module with ``main(argv=None) -> int``:

* ``python -m bagcert.cli.imagenet_a``: ImageNet-A (or wnid-matched subset) evaluation report.
* ``python -m bagcert.cli.defensive_patch``: make defensive patches and evaluate them.
* ``python -m bagcert.cli.roi``: Region of Importance / Region of Attack / neutralisation report.

Each writes results.json (environment and config included), summary.md and PNG figures into
``--output`` and prints a one-line JSON summary last.
"""
