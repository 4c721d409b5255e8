"""``python -m dilated.core.cli``."""

import sys

from dilated.core.cli import main

sys.exit(main())
