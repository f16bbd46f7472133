"""``python -m p2pgpu.testing.fuzz``: see ``p2pgpu.testing.fuzz.cli``."""

import sys

from p2pgpu.testing.fuzz.cli import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
