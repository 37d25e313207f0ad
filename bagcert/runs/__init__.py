"""End-to-end runs, each a typed config and one function (the command-line tools in :mod:`bagcert.cli` map argv to
the config, call the function and print its result)."""

from .train import train_run

__all__ = ["train_run"]
