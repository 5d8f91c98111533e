"""Where the benchmarks find the real data: ``$SUBNETS_UD_ROOT`` (UD treebanks) and
``$SUBNETS_E5_PATH`` (multilingual-e5-small), by default in ``../shared`` beside the repository.
``ud_root`` and ``e5_path`` stop a benchmark that needs one it cannot find, naming the
variable to set."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UD_ROOT = Path(os.environ.get("SUBNETS_UD_ROOT", REPO.parent / "shared" / "data" / "ud"))
E5_PATH = os.environ.get("SUBNETS_E5_PATH", str(REPO.parent / "shared" / "models" / "multilingual-e5-small"))


def ud_root() -> Path:
    """``UD_ROOT``, or exit saying to set ``SUBNETS_UD_ROOT`` where it is not a folder."""
    if not UD_ROOT.is_dir():
        sys.exit(f"UD treebanks not found at {UD_ROOT}: set SUBNETS_UD_ROOT to a folder of UD treebanks")
    return UD_ROOT


def e5_path() -> str:
    """``E5_PATH``, or exit saying to set ``SUBNETS_E5_PATH`` where it holds no model."""
    if not (Path(E5_PATH) / "config.json").is_file():
        sys.exit(f"multilingual-e5-small not found at {E5_PATH}: set SUBNETS_E5_PATH to a local copy of "
                 "intfloat/multilingual-e5-small")  # fmt: skip
    return E5_PATH
