"""``python -m subnets.export``: ``subnets.cli.export``."""

from subnets.cli.export import main

if __name__ == "__main__":
    main()
