"""The command line stays light: importing it and --help load neither torch nor h5py."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ablate_module = importlib.import_module("vlmcache.align.ablate")  # `vlmcache.ablate` is the function
train_module = importlib.import_module("vlmcache.align.train")





# --- a light command line --------------------------------------------------------------------------------------------


def test_cli_import_and_help_do_not_import_torch_or_h5py():
    probe = subprocess.run([sys.executable, "-c", "import sys, vlmcache.app.cli; "
                            "print('torch' in sys.modules, 'h5py' in sys.modules)"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["False", "False"]
    helped = subprocess.run([sys.executable, "-X", "importtime", "-m", "vlmcache", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "extract" in helped.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in helped.stderr.splitlines() if "|" in line}
    assert "typer" in imported and not imported & {"torch", "h5py", "transformers"}


