"""``python -m worker.cli``: the ``optionstore`` command."""

import sys

from worker.cli.commands import main

sys.exit(main())
