"""The benchmarks live in ``bench/`` at the repository root, outside the installed package.

No ``__init__.py`` here on purpose: it would make this directory a package named ``bench``
and hide the real one.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
