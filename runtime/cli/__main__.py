"""``python -m lowbit.runtime.cli``: the ``lowbit`` command."""

import sys

from lowbit.runtime.cli.entry import main

sys.exit(main())
