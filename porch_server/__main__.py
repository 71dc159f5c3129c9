"""`python -m porch_server` is the `porch` command."""

from porch_server.cli import main

main()
