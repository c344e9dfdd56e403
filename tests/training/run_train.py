"""``sed-fast train`` in a subprocess (torchrun, signals) with the tests' tiny model."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_synthetic  # noqa: E402

train_synthetic.tiny_build()

from sed_fast.training.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
