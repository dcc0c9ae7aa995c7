"""``python -m lmforge.models.native [-v]``: build the C++ decoding step ahead of time (see the package)."""

import sys

from lmforge.models.native import FAILED_FILE, build, build_dir

(build_dir() / FAILED_FILE).unlink(missing_ok=True)  # an explicit build tries again
build(verbose="-v" in sys.argv)
print(f"lmforge: C++ decoding step ready in {build_dir()}")
