"""`python -m prism_mcore ...`: see prism_mcore/cli.py."""

import sys

from prism_mcore.cli import main

sys.exit(main())
