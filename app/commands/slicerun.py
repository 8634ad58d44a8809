"""What `export` and `import` share: the configured store, and one line for any failure."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.storage import Storage


def run_on_store(job: Callable[[Storage], str]) -> int:
    """Run job on the configured store: its summary, or the reason it failed and exit 1."""
    from app.config import Config, ConfigError
    from app.slices import SliceError
    from app.storage import StoreError
    from app.storage.factory import make_storage

    try:
        summary = job(make_storage(Config.from_env()))
    except (ConfigError, StoreError, SliceError, OSError) as error:
        print(f"oci-pull-through: {error}", file=sys.stderr)
        return 1
    print(summary)
    return 0
