"""Where alignkit keeps what it downloads or converts (models, data sets)."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$ALIGNKIT_CACHE`` if set, else ``~/.cache/alignkit``."""
    root = os.environ.get("ALIGNKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "alignkit")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
