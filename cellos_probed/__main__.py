"""``python -m cellos_probed`` is the same program as ``cellos-probed``."""

from cellos_probed.cli import main

raise SystemExit(main())
