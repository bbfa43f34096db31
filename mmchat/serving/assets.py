"""Where the files shipped beside the code live: the demo model and the example pictures.

In a checkout (and an editable install, `pip install -e .`) that is the repository's `assets/`;
`pip install .` copies them to `<prefix>/share/mmchat/assets` (pyproject.toml's data-files), so
`mmchat-app` finds the demo model from any folder either way.
"""
from __future__ import annotations

import sys
from pathlib import Path

CHECKOUT_ASSETS = Path(__file__).resolve().parents[2] / "assets"
INSTALLED_ASSETS = Path(sys.prefix) / "share" / "mmchat" / "assets"


def assets_dir() -> Path:
    """The checkout's assets when present, else the installed copy (which may be missing too)."""
    return CHECKOUT_ASSETS if CHECKOUT_ASSETS.is_dir() else INSTALLED_ASSETS
