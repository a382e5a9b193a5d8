"""These tests need TRITON_INTERPRET=1 from process start; tests/kernels/test_interpreter.py runs them so."""

import os

collect_ignore_glob = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["test_*.py"]
