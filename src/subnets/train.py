"""``python -m subnets.train``: ``subnets.cli.train``."""

from subnets.cli.train import main

if __name__ == "__main__":
    main()
