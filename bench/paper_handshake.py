"""The paper's §3.4 handshake benchmark: ``python -m bench.paper_handshake [--quick] [--runs N] [--rtt MS]``.

The measurement itself lives in :mod:`qkdtls.apps.paper_bench` (also ``qkdtls bench-handshake``).
"""

from __future__ import annotations

import sys

from qkdtls.apps.paper_bench import main

if __name__ == "__main__":
    sys.exit(main())
