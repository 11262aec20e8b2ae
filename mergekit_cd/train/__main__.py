"""``python -m mergekit_cd.train ...`` (and ``accelerate launch -m mergekit_cd.train ...``): cd-train."""

import sys

from ..cli.train import main

if __name__ == "__main__":
    sys.exit(main())
