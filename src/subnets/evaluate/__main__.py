"""``python -m subnets.evaluate``: ``subnets.cli.evaluate``."""

from subnets.cli.evaluate import main

main()
