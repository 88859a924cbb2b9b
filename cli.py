"""Run the vlmcache CLI from a checkout: `python cli.py extract ...` (same as the `vlmcache` command)."""

from vlmcache.app.cli import main

if __name__ == "__main__":
    main()
