"""`oci-pull-through import slice.tar`: an air-gap slice loaded into the cache, verified."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the import subcommand."""
    parser = sub.add_parser("import", help="load an OCI image layout archive into the cache")
    parser.add_argument("archive", help="the slice (an OCI image layout tar)")
    parser.add_argument(
        "--repository",
        help="registry/name to store the images under (default: what export recorded, "
        "or the registry/name of each ref name)",
    )


def run(args: argparse.Namespace) -> int:
    """Verify every digest, then store blobs, manifests and tags in the configured store."""
    from app.config import Config, ConfigError
    from app.sliceimport import import_archive
    from app.slices import SliceError
    from app.storage import StoreError
    from app.storage.factory import make_storage

    try:
        done = import_archive(make_storage(Config.from_env()), args.archive, args.repository)
    except (ConfigError, StoreError, SliceError, OSError) as error:
        print(f"oci-pull-through: {error}", file=sys.stderr)
        return 1
    print(
        f"imported {done.blobs} new blobs, {done.manifests} manifests, tags: "
        f"{', '.join(done.tags) or 'none'}"
    )
    return 0
