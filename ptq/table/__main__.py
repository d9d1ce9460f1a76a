"""``python -m ptq.table``."""

import sys

from ptq.table.cli import main

sys.exit(main())
