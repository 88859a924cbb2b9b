"""docs/options.md, made from the option definitions themselves (`python -m vlmcache.app.reference`).

A test regenerates it and fails when the file in docs/ differs, so the tables cannot drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vlmcache.align.config import TrainConfig
from vlmcache.caption.config import CaptionConfig
from vlmcache.encode.config import ExtractConfig
from vlmcache.options import markdown_table

SECTIONS = (("vlmcache extract", ExtractConfig), ("vlmcache train, vlmcache ablate (every cell)", TrainConfig),
            ("vlmcache caption train", CaptionConfig))


def options_reference() -> str:
    """The Markdown text of docs/options.md."""
    parts = ["# Options\n", "Generated from the option definitions in the code (`python -m vlmcache.app.reference`); "
             "each table lists one config class's options. A TOML `--config` file takes the same keys (dashes or "
             "underscores) with values of the listed type; a value of another type is refused naming the key.\n"]
    for title, config in SECTIONS:
        parts.append(f"## {title}\n\n`{config.__module__}.{config.__name__}`\n\n{markdown_table(config)}")
    return "\n".join(parts)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/options.md")
    target.write_text(options_reference(), encoding="utf-8")
    print(f"wrote {target}")
