"""`oci-pull-through export IMAGE… -o slice.tar`: cached images as an OCI layout archive."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.storage import Storage


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the export subcommand."""
    parser = sub.add_parser(
        "export", help="write cached images to an OCI image layout archive (an air-gap slice)"
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="registry/name:tag or @digest")
    parser.add_argument("-o", "--output", required=True, help="the archive to write")
    parser.add_argument("--platform", help="os/arch[/variant]: only this platform of an index")


def run(args: argparse.Namespace) -> int:
    """Read the configured store (either backend) and write the slice, or name what is missing."""
    from app.commands.slicerun import run_on_store
    from app.slices import SliceError, plan_export, write_archive
    from app.units import format_bytes

    def export(storage: Storage) -> str:
        plan = plan_export(storage, args.images, args.platform)
        if plan.missing:
            raise SliceError(f"not cached: {', '.join(plan.missing)}")
        size = write_archive(storage, plan, args.output)
        return (
            f"exported {len(plan.entries)} images ({len(plan.objects)} objects, "
            f"{format_bytes(size)}) to {args.output}"
        )

    return run_on_store(export)
