"""``python -m ptq.intexec RUN_DIR``: export and verify a finished run's integer program."""

import sys

from ptq.intexec.verify import main

sys.exit(main())
