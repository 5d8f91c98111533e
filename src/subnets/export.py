"""``python -m subnets.export``: :mod:`subnets.cli.export`."""

from subnets.cli.export import main

if __name__ == "__main__":
    main()
