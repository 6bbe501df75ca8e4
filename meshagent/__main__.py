"""``python -m meshagent ...`` is the ``mesh`` command."""

from __future__ import annotations

import sys

from meshagent.cli import main

if __name__ == "__main__":
    sys.exit(main())
