"""The first users' entry point: `python -m gpumanager.main` runs the server, as `gpumanager` does."""

from __future__ import annotations

import sys

from gpumanager.cli import main

if __name__ == "__main__":
    sys.exit(main(["server", *sys.argv[1:]]))
