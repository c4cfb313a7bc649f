"""``python -m pdepth run ...`` / ``python -m pdepth report DIR``."""

import sys

from .cli import main

sys.exit(main())
