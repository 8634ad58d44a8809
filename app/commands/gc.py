"""`oci-pull-through gc`: remove crash leftovers, evict least-recently-used objects now.

Leftovers (SPEC §15) are spool files of flights whose fetcher died and temp files of
filesystem writers that died mid-write; files a live process holds (flocked) stay.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from app.units import format_bytes, parse_bytes

if TYPE_CHECKING:
    from app.config import Config


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the gc subcommand."""
    parser = sub.add_parser(
        "gc", help="evict LRU objects from the filesystem cache to 90%% of a bound"
    )
    parser.add_argument(
        "--max-bytes", type=parse_bytes, help="the bound (default FS_MAX_BYTES), e.g. 50Gi"
    )
    parser.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of lines")


def run(args: argparse.Namespace) -> int:
    """Sweep FS_ROOT like the server does; prints each evicted object and the totals."""
    from app.config import Config, ConfigError, spool_dir
    from app.eviction import sweep, sweep_lock

    try:
        config = Config.from_env()
    except ConfigError as error:
        print(f"oci-pull-through: {error}", file=sys.stderr)
        return 1
    leftovers = 0 if args.dry_run else sweep_leftovers(config)
    if not args.dry_run and not args.json:
        print(f"removed {leftovers} files left by dead processes")
    if config.storage_backend != "fs":
        print(
            "oci-pull-through gc: only the filesystem backend is bounded here; "
            "S3 expires objects with S3_LIFECYCLE_DAYS",
            file=sys.stderr,
        )
        return 1
    max_bytes = args.max_bytes if args.max_bytes is not None else config.fs_max_bytes
    if max_bytes is None:
        print(
            "oci-pull-through gc: no bound: set FS_MAX_BYTES or pass --max-bytes", file=sys.stderr
        )
        return 1
    state = spool_dir(config)
    with sweep_lock(state, wait=True):
        result = sweep(config.fs_root, max_bytes, dry_run=args.dry_run, skip=state)
    if args.json:
        doc = {
            "dry_run": bool(args.dry_run),
            "leftovers_removed": leftovers,
            "evicted": [{"key": e.key, "size": e.size} for e in result.evicted],
            "total": result.total,
            "remaining": result.remaining,
            "bound": max_bytes,
            "busy": result.busy,
        }
        print(json.dumps(doc, indent=2))
        return 0
    verb = "would evict" if args.dry_run else "evicted"
    for entry in result.evicted:
        print(f"{verb} {entry.key} {entry.size}")
    print(
        f"{verb} {len(result.evicted)} objects ({format_bytes(result.total - result.remaining)}); "
        f"cache {format_bytes(result.total)} -> {format_bytes(result.remaining)}, "
        f"bound {format_bytes(max_bytes)}; {result.busy} in use kept"
    )
    return 0


def sweep_leftovers(config: Config) -> int:
    """Spool files of dead fetchers (any backend), temp files of dead fs writers: how many."""
    from app.config import spool_dir
    from app.flight import sweep_leftovers as sweep_spool
    from app.storage.factory import make_storage

    removed = sweep_spool(spool_dir(config))
    # S3 is left alone here: building it sets up the bucket, and the proxy sweeps it at start.
    if config.storage_backend == "fs" and os.path.isdir(config.fs_root):
        removed += make_storage(config).sweep(0.0)
    return removed
