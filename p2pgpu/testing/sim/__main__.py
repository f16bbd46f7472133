"""``python -m p2pgpu.testing.sim``: see ``p2pgpu.testing.sim.cli``."""

import sys

from p2pgpu.testing.sim.cli import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
