"""`oci-pull-through gc`: evict least-recently-used objects from the filesystem cache now."""

from __future__ import annotations

import argparse
import sys

from app.units import format_bytes, parse_bytes


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the gc subcommand."""
    parser = sub.add_parser(
        "gc", help="evict LRU objects from the filesystem cache to 90%% of a bound"
    )
    parser.add_argument(
        "--max-bytes", type=parse_bytes, help="the bound (default FS_MAX_BYTES), e.g. 50Gi"
    )
    parser.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")


def run(args: argparse.Namespace) -> int:
    """Sweep FS_ROOT like the server does; prints each evicted object and the totals."""
    from app.config import Config, ConfigError, spool_dir
    from app.eviction import sweep, sweep_lock

    try:
        config = Config.from_env()
    except ConfigError as error:
        print(f"oci-pull-through: {error}", file=sys.stderr)
        return 1
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
    verb = "would evict" if args.dry_run else "evicted"
    for entry in result.evicted:
        print(f"{verb} {entry.key} {entry.size}")
    print(
        f"{verb} {len(result.evicted)} objects ({format_bytes(result.total - result.remaining)}); "
        f"cache {format_bytes(result.total)} -> {format_bytes(result.remaining)}, "
        f"bound {format_bytes(max_bytes)}; {result.busy} in use kept"
    )
    return 0
