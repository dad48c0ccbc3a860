"""Makes ``learn2learn.vision`` optional at ``import learn2learn`` (used by setup.sh).

learn2learn 0.2.0's ``__init__`` imports its vision subpackage, whose datasets need
torchvision; where no CPU build of torchvision can be installed, this wraps that one
import in ``try/except ImportError``. Usage: ``python _patch_l2l.py PATH/__init__.py``.
"""

import sys
from pathlib import Path

LINE = "from . import vision\n"
PATCHED = (
    "try:  # patched by maml_jax benchmarks/peers/setup.sh: torchvision absent\n"
    "    from . import vision\n"
    "except ImportError:\n"
    "    vision = None\n"
)

if __name__ == "__main__":
    path = Path(sys.argv[1])
    text = path.read_text()
    if PATCHED not in text:
        if text.count(LINE) != 1:
            sys.exit(f"{path}: expected one line {LINE.strip()!r}")
        path.write_text(text.replace(LINE, PATCHED))
