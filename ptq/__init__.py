"""ptq: post-training quantization experiments for torchvision Vision Transformers."""

import os as _os

__version__ = "0.1.0"

#: ``$TORCHINDUCTOR_CACHE_DIR`` as the user set it. Read here, before any ptq module imports torch:
#: importing ``torch._inductor`` writes its default (``/tmp/torchinductor_<user>``) into that
#: variable, after which the environment can no longer tell an explicit choice from the default.
USER_COMPILE_CACHE: str | None = _os.environ.get("TORCHINDUCTOR_CACHE_DIR")
