"""``bagcert models``: the models that ship with bagcert, with their card numbers.

    bagcert models            a table: name, data, clean and certified accuracy, the set they were measured on, file
    bagcert models --json     the same as a JSON list (one object per model; bagcert.shipped.ShippedModel fields)

Each name is what ``bagcert certify --checkpoint NAME`` and ``bagcert.load_checkpoint(NAME)`` accept, in a checkout
and in an installed package alike. The numbers are read from each model's shipped report (results.json): clean
accuracy and the accuracy certified against the card's patch size, on the set the report names. The model cards
(docs/ in the source repository) have the details.
"""

from __future__ import annotations

import json
import sys

from ._common import Parser

__all__ = ["build_parser", "main", "format_table"]


def build_parser(prog: str = "bagcert models") -> Parser:
    """The argument parser of ``bagcert models``."""
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    return p


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def format_table(models) -> str:
    """The table ``bagcert models`` prints for ``models`` (:func:`bagcert.shipped.shipped_models`' values), the
    default model marked with ``*``."""
    from ..shipped import DEFAULT_MODEL, data_location

    header = ("name", "data", "clean", "certified", "measured on", "file")
    rows = []
    for m in models:
        patch = m.card_patch if "x" in m.card_patch else f"{m.card_patch}x{m.card_patch}"
        rows.append((m.name + (" *" if m.name == DEFAULT_MODEL else ""), m.data, _pct(m.clean_accuracy),
                     f"{_pct(m.certified_accuracy)} ({patch})", m.evaluated_on or "n/a (report missing)", m.file))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in (header, *rows)]
    lines += [
        "",
        "* the default of bagcert certify. Use a model by its name: bagcert certify --checkpoint NAME, "
        "bagcert.load_checkpoint(NAME).",
        f"Files read from the {data_location()} ({'bagcert/_data' if data_location() == 'package' else 'checkpoints/'}); "
        "numbers from each model's shipped report; model cards: docs/model_card*.md in the source repository.",
    ]
    return "\n".join(lines)


def main(argv=None, prog: str = "bagcert models") -> int:
    """Print the shipped models; returns 0."""
    from ..shipped import shipped_models

    args = build_parser(prog).parse_args(argv)
    models = list(shipped_models().values())
    if args.json:
        sys.stdout.write(json.dumps([m.as_dict() for m in models], indent=2) + "\n")
    else:
        sys.stdout.write(format_table(models) + "\n")
    return 0
