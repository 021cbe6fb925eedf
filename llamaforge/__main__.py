"""`python -m llamaforge` is the `llamaforge` command."""

import sys

from llamaforge.cli.main import main

sys.exit(main())
