"""`oci-pull-through warm IMAGE...`: pull images through a running proxy so first pulls hit.

For each image: the manifest by tag, every platform's manifest of an index (or only
--platform), then each config and layer blob, read to the end and checked against its
digest. Progress per image and layer on a terminal (rich); quiet when not a terminal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import requests

from app.commands.warmref import ImageRef, parse_image, platform_matches
from app.commands.warmview import QuietView, RichView, make_view

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
CHUNK = 1024 * 1024
PARALLEL = 4

Progress = Callable[[int], None]


class WarmError(Exception):
    """One image could not be warmed; str() says which object and why."""


@dataclass
class Layer:
    """A blob to pull: config or layer of some platform's manifest."""

    digest: str
    size: int


@dataclass
class Result:
    """What `warm --json` reports for one image."""

    image: str
    ok: bool
    registry: str | None = None
    repository: str | None = None
    tag: str | None = None
    digest: str | None = None  # of the manifest (or index) the reference resolved to
    blobs: int = 0
    bytes: int = 0
    error: str | None = None


class Client:
    """Registry reads through the proxy, with the Bearer token dance if it asks for one."""

    def __init__(self, proxy: str, timeout: float = 60.0) -> None:
        self.proxy = proxy.rstrip("/")
        self.session = requests.Session()
        self.session.trust_env = False
        self.timeout = timeout
        self.token: str | None = None

    def get(self, path: str, accept: tuple[str, ...] = ()) -> requests.Response:
        """GET a registry path, streaming; retried once with a token after a Bearer 401."""
        headers = {"Accept": ", ".join(accept)} if accept else {}
        for _ in range(2):
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            response = self.session.get(
                self.proxy + path, headers=headers, stream=True, timeout=self.timeout
            )
            if response.status_code != 401 or self.token:
                return response
            challenge = response.headers.get("WWW-Authenticate", "")
            response.close()
            self.token = self._anonymous_token(challenge)
            if not self.token:
                return self.session.get(self.proxy + path, headers=headers, timeout=self.timeout)
        return response

    def _anonymous_token(self, challenge: str) -> str | None:
        from app.upstream import parse_bearer_challenge

        params = parse_bearer_challenge(challenge)
        if not params or "realm" not in params:
            return None
        query = {k: params[k] for k in ("service", "scope") if k in params}
        with self.session.get(params["realm"], params=query, timeout=self.timeout) as reply:
            if reply.status_code != 200:
                return None
            body = reply.json()
        return body.get("token") or body.get("access_token")


def _path(ref: ImageRef, kind: str, reference: str) -> str:
    return f"/v2/{ref.registry}/{ref.name}/{kind}/{reference}"


def fetch_manifest(client: Client, ref: ImageRef, reference: str) -> tuple[dict, str, str]:
    """A manifest document, its media type and its digest, through the proxy."""
    with client.get(_path(ref, "manifests", reference), MANIFEST_TYPES) as response:
        if response.status_code != 200:
            raise WarmError(f"manifest {reference}: HTTP {response.status_code}")
        body = response.content
        try:
            doc = json.loads(body)
        except ValueError:
            raise WarmError(f"manifest {reference}: not JSON") from None
    if not isinstance(doc, dict):
        raise WarmError(f"manifest {reference}: not a JSON object")
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if reference.startswith("sha256:") and digest != reference:
        raise WarmError(f"manifest {reference[:19]}: digest mismatch")
    media_type = doc.get("mediaType") or response.headers.get("Content-Type", "")
    return doc, media_type.split(";")[0].strip(), digest


def layers_of(client: Client, ref: ImageRef, platform: str | None) -> tuple[list[Layer], str]:
    """Every blob the image needs (of each platform of an index, or of the one manifest)."""
    doc, _, top_digest = fetch_manifest(client, ref, ref.reference)
    manifests = [doc]
    if "manifests" in doc:
        children = [m for m in doc["manifests"] if platform_matches(m.get("platform"), platform)]
        if not children:
            raise WarmError(f"no manifest for platform {platform}")
        manifests = [fetch_manifest(client, ref, m["digest"])[0] for m in children]
    blobs: dict[str, Layer] = {}
    for manifest in manifests:
        for item in [manifest.get("config"), *manifest.get("layers", [])]:
            if isinstance(item, dict) and "digest" in item:
                blobs[item["digest"]] = Layer(item["digest"], int(item.get("size", 0)))
    return list(blobs.values()), top_digest


def pull_blob(client: Client, ref: ImageRef, layer: Layer, progress: Progress) -> None:
    """Read a blob to its end and check its digest; raises WarmError naming it otherwise."""
    algorithm, _, expected = layer.digest.partition(":")
    hasher = hashlib.new(algorithm)
    try:
        with client.get(_path(ref, "blobs", layer.digest)) as response:
            if response.status_code != 200:
                raise WarmError(f"blob {layer.digest[:19]}: HTTP {response.status_code}")
            for chunk in response.iter_content(CHUNK):
                hasher.update(chunk)
                progress(len(chunk))
    except requests.RequestException as exc:
        raise WarmError(f"blob {layer.digest[:19]}: {exc}") from None
    if hasher.hexdigest() != expected:
        raise WarmError(f"blob {layer.digest[:19]}: digest mismatch")


def warm_image(
    client: Client, image: str, platform: str | None, view: QuietView | RichView
) -> Result:
    """Warm one image; the view shows progress (or nothing)."""
    ref = parse_image(image)
    try:
        layers, digest = layers_of(client, ref, platform)
    except requests.RequestException as exc:
        raise WarmError(f"manifest {ref.reference}: {exc}") from None
    image_task = view.image(image, sum(layer.size for layer in layers))
    with ThreadPoolExecutor(PARALLEL) as pool:

        def one(layer: Layer) -> None:
            advance = view.layer(image_task, layer.digest[7:19], layer.size)
            pull_blob(client, ref, layer, advance)

        for future in [pool.submit(one, layer) for layer in layers]:
            future.result()
    tag = ref.tag or (None if ref.reference.startswith("sha256:") else ref.reference)
    return Result(
        image=image,
        ok=True,
        registry=ref.registry,
        repository=ref.name,
        tag=tag,
        digest=digest,
        blobs=len(layers),
        bytes=sum(layer.size for layer in layers),
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the warm subcommand."""
    parser = sub.add_parser("warm", help="pull images through a running proxy to fill the cache")
    parser.add_argument(
        "images", nargs="*", metavar="IMAGE", help="e.g. docker.io/library/alpine:3"
    )
    parser.add_argument("--from-file", help="a file of images, one per line (# comments)")
    parser.add_argument("--platform", help="only this os/arch[/variant] of multi-platform images")
    parser.add_argument("--proxy", help="the proxy's URL (default: LISTEN_ADDR on loopback)")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document: a result per image"
    )


def run(args: argparse.Namespace) -> int:
    """Warm every image; exit 1 naming each one that failed."""
    images = list(args.images)
    if args.from_file:
        with open(args.from_file) as fh:
            images += [line.split("#", 1)[0].strip() for line in fh]
        images = [image for image in images if image]
    if not images:
        print("oci-pull-through warm: no images given", file=sys.stderr)
        return 2
    client = Client(args.proxy or _default_proxy())
    results: list[Result] = []
    with make_view(sys.stdout.isatty() and not args.json) as view:
        for image in images:
            try:
                results.append(warm_image(client, image, args.platform, view))
            except (WarmError, ValueError) as exc:
                results.append(Result(image=image, ok=False, error=str(exc)))
    failed = [result for result in results if not result.ok]
    for result in failed:
        print(f"oci-pull-through warm: failed: {result.image}: {result.error}", file=sys.stderr)
    if args.json:
        doc = {"images": [asdict(result) for result in results], "failed": len(failed)}
        print(json.dumps(doc, indent=2))
    return 1 if failed else 0


def _default_proxy() -> str:
    """The proxy on this host, as LISTEN_ADDR says (http://127.0.0.1:8080 by default)."""
    from app.config import Config, ConfigError, healthcheck_url

    try:
        config = Config.from_env()
    except ConfigError:
        return "http://127.0.0.1:8080"
    url = healthcheck_url(config.listen_addr, config.generate_self_signed_tls)
    return url.removesuffix("/healthz")
