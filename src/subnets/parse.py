"""``python -m subnets.parse``: the earlier name of ``python -m subnets.predict``
(``subnets.cli.predict``; the same command and arguments)."""

from subnets.cli.predict import main

if __name__ == "__main__":
    main()
