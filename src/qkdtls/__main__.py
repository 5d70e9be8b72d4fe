import sys

from qkdtls.cli.main import main

sys.exit(main())
