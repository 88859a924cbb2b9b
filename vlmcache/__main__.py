"""`python -m vlmcache ...` (and `torchrun -m vlmcache extract ...`) run the CLI."""

from vlmcache.app.cli import main

main()
