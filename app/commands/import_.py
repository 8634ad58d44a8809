"""`oci-pull-through import slice.tar`: an air-gap slice loaded into the cache, verified."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.storage import Storage


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
    from app.commands.slicerun import run_on_store
    from app.sliceimport import import_archive

    def load(storage: Storage) -> str:
        done = import_archive(storage, args.archive, args.repository)
        return (
            f"imported {done.blobs} new blobs, {done.manifests} manifests, tags: "
            f"{', '.join(done.tags) or 'none'}"
        )

    return run_on_store(load)
