"""``python -m mergeengine`` entry point."""

from mergeengine.cli import main

raise SystemExit(main())
