"""Pulls with the `oras` Python client (PyPI `oras`): its own per-request 401/token handling."""

from __future__ import annotations

import hashlib
import json
import logging
import types
from pathlib import Path

import oras.client
import oras.provider

INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)


class OrasPullError(RuntimeError):
    """The pull failed; the message says where."""


def _digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def oras_pull(
    host: str, repository: str, tag: str, outdir: Path, creds: tuple[str, str] | None = None
) -> dict[str, str]:
    """Pull a tag (every platform of an index) with oras-py; return {digest: file} verified."""
    logging.getLogger("oras").setLevel(logging.CRITICAL)
    client = oras.client.OrasClient(hostname=host, insecure=True)
    # oras-py retries every failed request 5 times with 3**n s of sleep (over 2 minutes);
    # an expected refusal should fail at once, so use the undecorated request method.
    undecorated = oras.provider.Registry.do_request.__wrapped__  # type: ignore[attr-defined]
    client.do_request = types.MethodType(undecorated, client)  # type: ignore[method-assign]
    if creds is not None:
        client.auth.set_basic_auth(*creds)
    answers: list[str] = []  # the last HTTP answer explains a failure (oras-py hides it)
    client.session.hooks["response"].append(
        lambda r, *args, **kwargs: answers.append(f"{r.status_code} {r.request.method} {r.url}")
    )
    outdir.mkdir(parents=True, exist_ok=True)
    ref = f"{host}/{repository}:{tag}"
    try:
        top = client.get_manifest(ref, allowed_media_type=[*INDEX_TYPES, *MANIFEST_TYPES])
        manifests = [top]
        if top.get("mediaType") in INDEX_TYPES:
            manifests = [
                client.get_manifest(
                    f"{host}/{repository}@{entry['digest']}",
                    allowed_media_type=list(MANIFEST_TYPES),
                )
                for entry in top["manifests"]
            ]
        pulled: dict[str, str] = {}
        container = client.get_container(ref)
        for manifest in manifests:
            for blob in [manifest["config"], *manifest["layers"]]:
                path = outdir / blob["digest"].split(":", 1)[1]
                client.download_blob(container, blob["digest"], str(path))
                if _digest(path) != blob["digest"]:
                    raise OrasPullError(f"blob {blob['digest']} arrived corrupt")
                pulled[blob["digest"]] = path.name
        (outdir / "index.json").write_text(json.dumps(top))
        return pulled
    except Exception as exc:  # oras-py raises ValueError and others for HTTP failures
        last = answers[-1] if answers else "none"
        raise OrasPullError(f"oras pull of {ref} failed: {exc} (last answer: {last})") from exc
