"""``python -m lmforge.models.native [-v]``: build the C++ decoding step ahead of time (see the package)."""

import sys

from lmforge.models.native import build, build_dir

build(verbose="-v" in sys.argv)
print(f"lmforge: C++ decoding step ready in {build_dir()}")
