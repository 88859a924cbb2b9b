"""`python -m vlmcache ...` (and `torchrun -m vlmcache extract ...`) run the CLI."""

from vlmcache.cli import main

main()
