"""``bagcert``: one command for the toolkit's programs (installed by ``pip install -e .``; also ``python -m bagcert``).

    bagcert certify [options]           certify a checkpoint against adversarial patches, write a report
    bagcert train [options]             train a bagcert model or a peer classifier
    bagcert imagenet-a [options]        ImageNet-A / subset evaluation: accuracy, calibration, AURRA
    bagcert defensive-patch [options]   make and evaluate a defensive patch
    bagcert roi [options]               regions of importance and attack, and their neutralisation
    bagcert models [--json]             the shipped models with their card numbers

``bagcert <command> --help`` shows a command's options with their defaults. The rest of the command line
is handed to the command's ``main(argv)`` unchanged. An unknown command is one line on stderr and exit
status 2.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys

__all__ = ["COMMANDS", "main"]

#: command -> (module whose ``main(argv)`` runs it, one-line description)
COMMANDS = {
    "certify": ("bagcert.cli.certify", "certify a checkpoint against adversarial patches and write a report"),
    "train": ("bagcert.cli.train", "train a bagcert model or a peer classifier (CPU, one GPU or torchrun)"),
    "imagenet-a": ("bagcert.cli.imagenet_a", "ImageNet-A or ImageNet-subset evaluation: accuracy, calibration error, AURRA"),
    "defensive-patch": ("bagcert.cli.defensive_patch", "make a defensive patch for a model and evaluate it"),
    "roi": ("bagcert.cli.roi", "regions of importance and attack, and how well neutralising them restores accuracy"),
    "models": ("bagcert.cli.models", "list the shipped models (names for --checkpoint) with their card numbers"),
}


def _help() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: bagcert <command> [options]   (or: python -m bagcert <command> [options])", "",
             "Certify and attack image classifiers against adversarial patches (BagCert and peers).", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run 'bagcert <command> --help' for a command's options and their defaults."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Run ``bagcert <command> ...``; returns the command's exit status (2 for a missing or unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.stderr.write(_help())
        return 2
    if argv[0] in ("-h", "--help"):
        sys.stdout.write(_help())
        return 0
    name = argv[0]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        sys.stderr.write(f"bagcert: unknown command {name!r}{hint}; choose from {', '.join(COMMANDS)} (see bagcert --help)\n")
        return 2
    module_name = COMMANDS[name][0]
    run = importlib.import_module(module_name).main
    kwargs = {"prog": f"bagcert {name}"} if "prog" in inspect.signature(run).parameters else {}
    rc = run(argv[1:], **kwargs)
    return 0 if rc is None else int(rc)


if __name__ == "__main__":
    raise SystemExit(main())
