"""``python -m dptune.cli``: the same as the ``dptune`` command."""

import sys

from dptune.cli.commands import main

sys.exit(main())
