"""``python -m subnets.consolidate``: ``subnets.cli.consolidate``."""

from subnets.cli.consolidate import main

if __name__ == "__main__":
    main()
