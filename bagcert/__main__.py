"""``python -m bagcert <command> ...``: the ``bagcert`` command (:mod:`bagcert.cli.main`)."""

from bagcert.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
