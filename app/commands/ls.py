"""`oci-pull-through ls`: the cached repositories, their tags and sizes, from the store."""

from __future__ import annotations

import argparse
import datetime
import json
import sys

from app.units import format_bytes


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ls subcommand."""
    parser = sub.add_parser("ls", help="list cached repositories, tags and sizes")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of a table")


def run(args: argparse.Namespace) -> int:
    """Read the configured store (either backend) and print what it holds."""
    from app.config import Config, ConfigError
    from app.inventory import Inventory
    from app.storage import StoreError
    from app.storage.factory import make_storage

    try:
        config = Config.from_env()
        inventory = Inventory(make_storage(config))
        repositories = inventory.repositories()
        blobs = inventory.blob_sizes()
    except (ConfigError, StoreError) as error:
        print(f"oci-pull-through: {error}", file=sys.stderr)
        return 1
    if args.json:
        doc = {
            "repositories": [
                {
                    "repository": f"{repo.registry}/{repo.name}",
                    "size": repo.size,
                    "tags": [
                        {
                            "tag": t.tag,
                            "digest": t.digest,
                            "media_type": t.media_type,
                            "size": t.size,
                            "stored_at": t.stored_at,
                            "manifests": sorted(t.manifests),
                            "blobs": sorted(t.blobs),
                        }
                        for t in repo.tags
                    ],
                }
                for repo in repositories
            ],
            "blobs": {"count": len(blobs), "size": sum(blobs.values())},
        }
        print(json.dumps(doc, indent=2))
        return 0
    rows = [("REPOSITORY", "TAG", "DIGEST", "SIZE", "STORED")]
    for repo in repositories:
        for t in repo.tags:
            stored = datetime.datetime.fromtimestamp(t.stored_at, datetime.UTC)
            rows.append(
                (
                    f"{repo.registry}/{repo.name}",
                    t.tag or "<none>",
                    t.digest[:19],
                    format_bytes(t.size),
                    stored.strftime("%Y-%m-%d %H:%M:%SZ"),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    print(
        f"{len(repositories)} repositories, {sum(len(r.tags) for r in repositories)} tags, "
        f"{len(blobs)} blobs ({format_bytes(sum(blobs.values()))})"
    )
    return 0
