"""`python -m sfsync` is the `sfsync` command."""

from sfsync.cli import main

main()
