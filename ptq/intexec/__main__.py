"""``python -m ptq.intexec RUN_DIR``: export and verify a finished run's integer ONNX model."""

import sys

from ptq.intexec.verify import main

sys.exit(main())
