"""`python -m gpumanager`: the same as the `gpumanager` command."""

from __future__ import annotations

import sys

from gpumanager.cli import main

sys.exit(main())
