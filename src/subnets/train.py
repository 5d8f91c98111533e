"""``python -m subnets.train``: :mod:`subnets.cli.train`."""

from subnets.cli.train import main

if __name__ == "__main__":
    main()
