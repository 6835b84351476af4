"""`python -m fedtune …` is the `fedtune` command."""

import sys

from fedtune.cli import main

sys.exit(main())
