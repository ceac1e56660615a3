"""``python -m dptune.cli``: the same as the ``dptune`` command."""

import sys

from dptune.cli.app import main

sys.exit(main())
