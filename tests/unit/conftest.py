"""Unit tests of the model's pure logic: no server, no vLLM engine.

The model's modules import triton_python_backend_utils, which only Triton's
Python backend provides: here a stand-in (stubs/) takes its place.
"""

import sys
from pathlib import Path

STUBS = Path(__file__).resolve().parent / "stubs"
sys.path.insert(0, str(STUBS))
