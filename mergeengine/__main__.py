"""``python -m mergeengine`` entry point."""

from mergeengine.cli import console_main

console_main()
