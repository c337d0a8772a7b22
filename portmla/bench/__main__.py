"""``python -m portmla.bench`` = ``python -m portmla bench``."""

import sys

from .cli import main

sys.exit(main())
