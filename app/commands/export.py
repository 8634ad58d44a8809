"""`oci-pull-through export IMAGE… -o slice.tar`: cached images as an OCI layout archive."""

from __future__ import annotations

import argparse
import sys


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
    from app.config import Config, ConfigError
    from app.slices import SliceError, plan_export, write_archive
    from app.storage import StoreError
    from app.storage.factory import make_storage
    from app.units import format_bytes

    try:
        storage = make_storage(Config.from_env())
        plan = plan_export(storage, args.images, args.platform)
        if plan.missing:
            print(f"oci-pull-through: not cached: {', '.join(plan.missing)}", file=sys.stderr)
            return 1
        size = write_archive(storage, plan, args.output)
    except (ConfigError, StoreError, SliceError, OSError) as error:
        print(f"oci-pull-through: {error}", file=sys.stderr)
        return 1
    print(
        f"exported {len(plan.entries)} images ({len(plan.objects)} objects, "
        f"{format_bytes(size)}) to {args.output}"
    )
    return 0
