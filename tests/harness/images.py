"""Build OCI test images on disk and move them with skopeo (no docker, no internet)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SKOPEO_BINARY = "skopeo"

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
# What skopeo, containerd and Docker accept for a tag; only such a request writes a
# tag's cache entry (SPEC §15 "Tags").
EVERY_MANIFEST_TYPE = (MT_OCI_INDEX, MT_OCI_MANIFEST, MT_DOCKER_LIST, MT_DOCKER_MANIFEST)
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

DEFAULT_PLATFORMS = ("linux/amd64", "linux/arm64")
DEFAULT_LAYER_SIZES = (4 * 1024, 1024 * 1024)
_CREATED = "2024-01-01T00:00:00Z"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

Compression = Literal["gzip", "none"]
PullFormat = Literal["dir", "oci"]


class SkopeoError(RuntimeError):
    """Raised when a skopeo command that must succeed fails."""


def sha256_digest(data: bytes) -> str:
    """Return ``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    """Return ``sha256:<hex>`` of a file's content, streaming."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def dir_digests(path: Path) -> dict[str, str]:
    """Return {relative path: sha256 digest} for every regular file under ``path``."""
    root = Path(path)
    return {
        p.relative_to(root).as_posix(): file_digest(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob: digest, size, media type and the raw bytes."""

    digest: str
    size: int
    media_type: str
    data: bytes

    @classmethod
    def of(cls, data: bytes, media_type: str) -> Blob:
        """Create a blob from bytes."""
        return cls(sha256_digest(data), len(data), media_type, data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        """Return an OCI descriptor for this blob."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}

    @property
    def hex(self) -> str:
        """The digest without its ``sha256:`` prefix."""
        return self.digest.split(":", 1)[1]


@dataclass(frozen=True)
class PlatformImage:
    """One platform's image: manifest, config, layers and uncompressed diff IDs."""

    platform: str
    os: str
    architecture: str
    variant: str | None
    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]
    diff_ids: tuple[str, ...]

    @property
    def manifest_digest(self) -> str:
        """Digest of this platform's manifest."""
        return self.manifest.digest

    @property
    def config_digest(self) -> str:
        """Digest of this platform's config blob."""
        return self.config.digest

    @property
    def layer_digests(self) -> list[tuple[str, int]]:
        """(digest, size) of every layer, in order."""
        return [(layer.digest, layer.size) for layer in self.layers]

    def blobs(self) -> list[Blob]:
        """Config and layers (what GET /v2/<repo>/blobs/ serves)."""
        return [self.config, *self.layers]


@dataclass(frozen=True)
class BuiltImage:
    """An image written to an OCI layout, with every digest and the raw bytes."""

    layout_dir: Path
    tag: str
    index: Blob | None
    images: tuple[PlatformImage, ...]

    @property
    def top(self) -> Blob:
        """What the tag resolves to: the index, or the single manifest."""
        return self.index if self.index is not None else self.images[0].manifest

    @property
    def ref_digest(self) -> str:
        """Digest the tag points at (index digest if multi-platform)."""
        return self.top.digest

    @property
    def index_digest(self) -> str | None:
        """Digest of the image index, or None for a single-manifest image."""
        return self.index.digest if self.index is not None else None

    @property
    def manifest_digests(self) -> dict[str, str]:
        """{platform: manifest digest}."""
        return {img.platform: img.manifest.digest for img in self.images}

    @property
    def manifest(self) -> Blob:
        """The first platform's manifest (the only one for single-platform images)."""
        return self.images[0].manifest

    @property
    def manifest_digest(self) -> str:
        """Digest of the first platform's manifest."""
        return self.images[0].manifest.digest

    @property
    def config_digest(self) -> str:
        """Digest of the first platform's config."""
        return self.images[0].config.digest

    def platform(self, name: str) -> PlatformImage:
        """Return the image for ``name`` (e.g. ``linux/arm64``)."""
        for img in self.images:
            if img.platform == name:
                return img
        raise KeyError(name)

    def blobs(self) -> dict[str, Blob]:
        """Every config and layer blob of every platform, by digest."""
        return {b.digest: b for img in self.images for b in img.blobs()}

    def manifests(self) -> dict[str, Blob]:
        """The index (if any) and every manifest, by digest."""
        out = {img.manifest.digest: img.manifest for img in self.images}
        if self.index is not None:
            out[self.index.digest] = self.index
        return out

    def all_blobs(self) -> dict[str, Blob]:
        """Every piece of content (index, manifests, configs, layers), by digest."""
        return {**self.manifests(), **self.blobs()}

    def push(self, dest: str, creds: str | None = None) -> subprocess.CompletedProcess[str]:
        """Push this image's tag to ``dest`` (see ``push``)."""
        return push(self.layout_dir, self.tag, dest, creds)


def _split_platform(platform: str) -> tuple[str, str, str | None]:
    """Split ``os/arch[/variant]``."""
    parts = platform.split("/")
    if len(parts) not in (2, 3):
        raise ValueError(f"bad platform {platform!r}, want os/arch[/variant]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _random_bytes(rng: random.Random, size: int) -> bytes:
    """Random bytes in 1 MiB pieces: one randbytes() call overflows past 256 MiB."""
    piece = 1 << 20
    return b"".join(rng.randbytes(min(piece, size - i)) for i in range(0, size, piece))


def make_layer(payload: bytes, name: str, compression: Compression) -> tuple[Blob, str]:
    """Return (layer blob, diff_id) for a tar holding ``payload`` as ``e2e/<name>``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo("e2e")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1704067200
        tar.addfile(d)
        f = tarfile.TarInfo(f"e2e/{name}")
        f.size, f.mode, f.mtime = len(payload), 0o644, 1704067200
        tar.addfile(f, io.BytesIO(payload))
    raw = buf.getvalue()
    diff_id = sha256_digest(raw)
    if compression == "gzip":
        return Blob.of(gzip.compress(raw, compresslevel=1, mtime=0), MT_OCI_LAYER_GZIP), diff_id
    if compression == "none":
        return Blob.of(raw, MT_OCI_LAYER), diff_id
    raise ValueError(f"unknown compression {compression!r}")


def _json_bytes(obj: Any) -> bytes:
    """Serialise JSON the way it is stored (the bytes are what get hashed)."""
    return json.dumps(obj, indent=2, sort_keys=True).encode()


def _write_blob(layout: Path, blob: Blob) -> None:
    """Store a blob under blobs/sha256/."""
    path = layout / "blobs" / "sha256" / blob.hex
    if not path.exists():
        path.write_bytes(blob.data)


def _build_platform(
    platform: str,
    layer_sizes: Sequence[int],
    compression: Compression,
    rng: random.Random,
    label: str,
) -> PlatformImage:
    """Build one platform's layers, config and manifest in memory."""
    os_name, arch, variant = _split_platform(platform)
    layers: list[Blob] = []
    diff_ids: list[str] = []
    for i, size in enumerate(layer_sizes):
        blob, diff_id = make_layer(_random_bytes(rng, size), f"layer{i}.bin", compression)
        layers.append(blob)
        diff_ids.append(diff_id)
    config: dict[str, Any] = {
        "created": _CREATED,
        "architecture": arch,
        "os": os_name,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/e2e/layer0.bin"],
            "Labels": {"org.example.e2e": label, "org.example.platform": platform},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": _CREATED, "created_by": f"e2e harness layer {i}"}
            for i in range(len(layers))
        ],
    }
    if variant:
        config["variant"] = variant
    config_blob = Blob.of(_json_bytes(config), MT_OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    return PlatformImage(
        platform=platform,
        os=os_name,
        architecture=arch,
        variant=variant,
        manifest=Blob.of(_json_bytes(manifest), MT_OCI_MANIFEST),
        config=config_blob,
        layers=tuple(layers),
        diff_ids=tuple(diff_ids),
    )


def build_image(
    layout_dir: Path,
    tag: str = "latest",
    *,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    layer_sizes: Sequence[int] = DEFAULT_LAYER_SIZES,
    compression: Compression = "gzip",
    multi_platform: bool | None = None,
    seed: int | None = None,
) -> BuiltImage:
    """Write a random image to the OCI layout ``layout_dir`` under ``tag`` and describe it.

    With ``multi_platform`` (default: more than one platform) the tag points at an OCI
    index; otherwise it points at the single platform's manifest. Several tags may share
    one layout directory. ``seed`` makes the content reproducible; by default it is random.
    """
    if not platforms:
        raise ValueError("need at least one platform")
    multi = len(platforms) > 1 if multi_platform is None else multi_platform
    if not multi and len(platforms) != 1:
        raise ValueError("a single-manifest image needs exactly one platform")
    rng = random.Random(seed if seed is not None else int.from_bytes(os.urandom(8), "big"))
    label = f"{tag}-{rng.getrandbits(64):016x}"
    images = tuple(_build_platform(p, layer_sizes, compression, rng, label) for p in platforms)
    index: Blob | None = None
    if multi:
        entries = []
        for img in images:
            plat: dict[str, str] = {"architecture": img.architecture, "os": img.os}
            if img.variant:
                plat["variant"] = img.variant
            entries.append(img.manifest.descriptor(platform=plat))
        index_doc = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": entries}
        index = Blob.of(_json_bytes(index_doc), MT_OCI_INDEX)
    built = BuiltImage(layout_dir=Path(layout_dir), tag=tag, index=index, images=images)
    _write_layout(built)
    return built


def _write_layout(image: BuiltImage) -> None:
    """Write blobs, oci-layout and index.json (replacing any previous entry for the tag)."""
    layout = image.layout_dir
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    for blob in image.all_blobs().values():
        _write_blob(layout, blob)
    index_path = layout / "index.json"
    doc: dict[str, Any] = {"schemaVersion": 2, "manifests": []}
    if index_path.exists():
        doc = json.loads(index_path.read_text())
    doc["manifests"] = [
        m
        for m in doc.get("manifests", [])
        if m.get("annotations", {}).get(REF_NAME_ANNOTATION) != image.tag
    ]
    doc["manifests"].append(image.top.descriptor(annotations={REF_NAME_ANNOTATION: image.tag}))
    index_path.write_text(json.dumps(doc, indent=2))


# -- skopeo --------------------------------------------------------------------------------


def skopeo_exe() -> str:
    """Return the skopeo path or fail with a clear message."""
    exe = shutil.which(SKOPEO_BINARY)
    if exe is None:
        raise SkopeoError("skopeo not found on PATH (Debian package skopeo)")
    return exe


def _docker_ref(ref: str) -> str:
    """Prefix ``docker://`` if missing."""
    return ref if "://" in ref else f"docker://{ref}"


def run_skopeo(args: Sequence[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run skopeo with a policy that accepts anything; never raises on exit status."""
    cmd = [skopeo_exe(), "--insecure-policy", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def push(
    layout_dir: Path,
    ref_tag: str,
    dest: str,
    creds: str | None = None,
    *,
    all_platforms: bool = True,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Copy ``oci:layout_dir:ref_tag`` to ``dest`` (docker://HOST/REPO:TAG); raise on failure."""
    args = ["copy", "--preserve-digests", "--dest-tls-verify=false"]
    if all_platforms:
        args.append("--all")
    args += ["--dest-creds", creds] if creds else ["--dest-no-creds"]
    args += [f"oci:{layout_dir}:{ref_tag}", _docker_ref(dest)]
    proc = run_skopeo(args, timeout)
    if proc.returncode != 0:
        raise SkopeoError(
            f"skopeo push to {dest} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
        )
    return proc


def skopeo_pull(
    src_ref: str,
    dest_dir: Path,
    creds: str | None = None,
    tls_verify: bool = False,
    *,
    fmt: PullFormat = "dir",
    all_platforms: bool = True,
    platform: str | None = None,
    preserve_digests: bool = True,
    extra_args: Iterable[str] = (),
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Copy ``src_ref`` into a ``dir:``/``oci:`` destination; returns the process, never raises."""
    args: list[str] = []
    if platform:
        os_name, arch, variant = _split_platform(platform)
        args += ["--override-os", os_name, "--override-arch", arch]
        if variant:
            args += ["--override-variant", variant]
    args += ["copy", f"--src-tls-verify={'true' if tls_verify else 'false'}"]
    if preserve_digests:
        args.append("--preserve-digests")
    if all_platforms:
        args.append("--all")
    args += ["--src-creds", creds] if creds else ["--src-no-creds"]
    args += list(extra_args)
    args += [_docker_ref(src_ref), f"{fmt}:{dest_dir}"]
    return run_skopeo(args, timeout)


def verify_pulled(
    dest_dir: Path,
    image: BuiltImage,
    *,
    fmt: PullFormat = "dir",
    platforms: Iterable[str] | None = None,
) -> dict[str, str]:
    """Check every expected blob was pulled with correct content; return {digest: file}.

    Raises AssertionError listing missing or corrupt content. ``platforms`` limits the check
    to some platforms (for single-platform pulls); by default every platform and the index
    (for multi-platform images) must be present.
    """
    root = Path(dest_dir)
    wanted = list(platforms) if platforms is not None else [i.platform for i in image.images]
    expected: dict[str, Blob] = {}
    for name in wanted:
        img = image.platform(name)
        expected[img.manifest.digest] = img.manifest
        expected.update({b.digest: b for b in img.blobs()})
    if platforms is None and image.index is not None:
        expected[image.index.digest] = image.index

    found: dict[str, Path] = {}
    if fmt == "oci":
        for p in (root / "blobs" / "sha256").glob("*"):
            found["sha256:" + p.name] = p
    else:
        for p in root.iterdir():
            if _HEX64.match(p.name):
                found["sha256:" + p.name] = p
            elif p.name.endswith(".manifest.json") and _HEX64.match(p.name.split(".")[0]):
                found["sha256:" + p.name.split(".")[0]] = p
        top = root / "manifest.json"
        if top.exists():
            found.setdefault(file_digest(top), top)

    problems: list[str] = []
    result: dict[str, str] = {}
    for digest, blob in expected.items():
        path = found.get(digest)
        if path is None:
            problems.append(f"missing {blob.media_type} {digest}")
            continue
        actual = file_digest(path)
        if actual != digest or path.stat().st_size != blob.size:
            problems.append(f"corrupt {digest}: file {path.name} hashes to {actual}")
        result[digest] = path.name
    for digest, path in found.items():
        if path.parent.name == "sha256" or _HEX64.match(path.name):
            actual = file_digest(path)
            if actual != digest:
                problems.append(f"blob file {path} named {digest} hashes to {actual}")
    if problems:
        raise AssertionError(f"pulled content in {root} is wrong:\n  " + "\n  ".join(problems))
    return result
