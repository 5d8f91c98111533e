"""``python -m subnets.report``: :mod:`subnets.cli.report`."""

from subnets.cli.report import main

main()
