"""``python -m subnets.evaluate``: :mod:`subnets.cli.evaluate`."""

from subnets.cli.evaluate import main

main()
