"""``python -m subnets.predict``: ``subnets.cli.predict``."""

from subnets.cli.predict import main

if __name__ == "__main__":
    main()
