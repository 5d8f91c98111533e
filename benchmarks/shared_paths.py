"""Where the benchmarks find the real data: ``$SUBNETS_UD_ROOT`` (UD treebanks) and
``$SUBNETS_E5_PATH`` (multilingual-e5-small), by default in ``../shared`` beside the repository."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UD_ROOT = Path(os.environ.get("SUBNETS_UD_ROOT", REPO.parent / "shared" / "data" / "ud"))
E5_PATH = os.environ.get("SUBNETS_E5_PATH", str(REPO.parent / "shared" / "models" / "multilingual-e5-small"))
