"""`python -m fedge.cli` runs the `fedge` command."""

import sys

from fedge.cli import main

sys.exit(main())
