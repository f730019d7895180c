import os
import sys

# Every kernel output starts as NaN, so a test fails if a kernel leaves an element
# unwritten (read once, when the extension first runs).
os.environ.setdefault("LONGNET_POISON_OUTPUTS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
