"""``python -m subnets.parse ...``: the earlier name of ``python -m subnets.predict`` (the same
command and arguments; :mod:`subnets.predict`)."""

from subnets.cli import main_of
from subnets.predict import __doc__ as usage
from subnets.predict import predict_command as parse_command

__all__ = ["parse_command"]

if __name__ == "__main__":
    main_of(parse_command, usage)
