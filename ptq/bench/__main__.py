"""``python -m ptq.bench``."""

import sys

from ptq.bench.cli import main

sys.exit(main())
