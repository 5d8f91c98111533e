"""``python -m subnets.report``: ``subnets.cli.report``."""

from subnets.cli.report import main

main()
