"""Cluster-wide single flight: three replicas sharing one SeaweedFS bucket (issue 13).

Each replica has its own SPOOL_DIR and TMPDIR (on one host a shared spool would coalesce
them through flock alone and prove nothing about peers), its own PEER_URL, and PEERS
listing all three.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests

from app.peers import AUTH_HEADER, CREDENTIAL_HEADER, PeerAuth, canonical_url, rendezvous
from app.storage import keys
from tests.harness.fakeupstream import FakeUpstream, bearer_only
from tests.harness.ports import free_port
from tests.harness.proxyproc import ProxyServer
from tests.harness.scrape import metric
from tests.harness.seaweed import SeaweedFS

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024
SECRET = "cluster-secret-for-e2e-tests"
BUCKET = "e2e-cluster"
_prefixes = itertools.count()

Cluster = list[ProxyServer]


@pytest.fixture
def cluster(
    make_proxy: Callable[..., ProxyServer],
    fake: FakeUpstream,
    seaweed_server: SeaweedFS,
    tmp_path: Path,
) -> Cluster:
    """Three gunicorn replicas on loopback, one bucket and prefix, each its own spool."""
    return start_cluster(make_proxy, fake, seaweed_server, tmp_path)


def start_cluster(
    make_proxy: Callable[..., ProxyServer],
    fake: FakeUpstream,
    seaweed_server: SeaweedFS,
    tmp_path: Path,
    **extra: str,
) -> Cluster:
    """The replicas of the cluster fixture, with extra environment for each."""
    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    prefix = f"cluster{next(_prefixes)}-{os.getpid()}"
    started = []
    for i, port in enumerate(ports):
        own = tmp_path / f"replica{i}"
        (own / "tmp").mkdir(parents=True)
        env = {
            "STORAGE_BACKEND": "s3",
            **seaweed_server.env(),
            "S3_BUCKET": BUCKET,
            "S3_PREFIX": prefix,
            "SPOOL_DIR": str(own / "spool"),
            "TMPDIR": str(own / "tmp"),
            "UPSTREAM_REGISTRY": fake.host,
            "INSECURE_REGISTRIES": fake.host,
            "PEERS": ",".join(urls),
            "PEER_URL": urls[i],
            "CLUSTER_SECRET": SECRET,
            "WEB_CONCURRENCY": "2",
            **extra,
        }
        started.append(make_proxy(env, port=port))
    return started


def owner_of(cluster: Cluster, digest: str) -> int:
    """Which replica owns a blob, by the same rendezvous hash the replicas use."""
    urls = [canonical_url(p.url) for p in cluster]
    return urls.index(rendezvous(urls, keys.blob(digest)))


def get_many(urls: list[str]) -> list[tuple[int, bytes] | Exception]:
    """GET every URL at once, one thread each; a cut response is its exception."""
    results: list[tuple[int, bytes] | Exception] = [Exception("not run")] * len(urls)

    def one(i: int) -> None:
        try:
            with requests.get(urls[i], timeout=120) as r:
                results[i] = (r.status_code, r.content)
        except requests.RequestException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(urls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    return results


def shown(results: list[tuple[int, bytes] | Exception]) -> list[object]:
    return [r if isinstance(r, Exception) else (r[0], len(r[1])) for r in results]


def open_uploads(proxy: ProxyServer) -> list[dict]:
    listed = proxy.s3_client().list_multipart_uploads(Bucket=BUCKET)
    return list(listed.get("Uploads", []))


def stored_bytes(proxy: ProxyServer, digest: str) -> bytes:
    obj = proxy.s3_client().get_object(Bucket=BUCKET, Key=proxy.s3_key(digest))
    return obj["Body"].read()


def test_thirty_clients_over_three_replicas_make_one_upstream_get(
    cluster: Cluster, fake: FakeUpstream
) -> None:
    digest, data = fake.blob("co/repo", 64 * MiB, chunk=MiB, delay_per_chunk=0.02)
    urls = [f"{cluster[i % 3].url}/v2/co/repo/blobs/{digest}" for i in range(30)]
    started = time.monotonic()
    results = get_many(urls)
    wall = time.monotonic() - started
    assert all(r == (200, data) for r in results), shown(results)
    assert fake.count("GET", digest) == 1
    owner = owner_of(cluster, digest)
    assert cluster[owner].wait_cached([digest], timeout=20) == []
    assert hashlib.sha256(stored_bytes(cluster[owner], digest)).hexdigest() == digest[7:]
    assert open_uploads(cluster[owner]) == []
    askers = [p for i, p in enumerate(cluster) if i != owner]
    assert [metric(p, "oci_peer_fetches_total", outcome="ok") for p in askers] == [1.0, 1.0]
    assert metric(cluster[owner], "oci_peer_requests_total", outcome="served") == 2.0
    assert sum(metric(p, "oci_peer_bytes_total") for p in askers) == 2 * len(data)
    print(f"30 clients, 3 replicas, 64 MiB cold: 1 upstream GET, {wall:.2f}s")


def test_owner_killed_mid_stream_cuts_clients_and_a_retry_succeeds(
    cluster: Cluster, fake: FakeUpstream
) -> None:
    digest, data = fake.blob("co/repo", 64 * MiB, chunk=MiB, delay_per_chunk=0.08)
    owner = owner_of(cluster, digest)
    askers = [p for i, p in enumerate(cluster) if i != owner]
    urls = [f"{askers[i % 2].url}/v2/co/repo/blobs/{digest}" for i in range(10)]
    urls += [f"{cluster[owner].url}/v2/co/repo/blobs/{digest}" for _ in range(4)]
    results: list[tuple[int, bytes] | Exception] = []
    runner = threading.Thread(target=lambda: results.extend(get_many(urls)))
    runner.start()
    time.sleep(1.5)  # about a third of the body has gone through the owner to the askers
    assert fake.count("GET", digest) == 1
    proc = cluster[owner].proc
    assert proc is not None
    os.killpg(proc.pid, signal.SIGKILL)
    runner.join(timeout=150)
    assert len(results) == len(urls)
    assert not any(not isinstance(r, Exception) and r != (200, data) for r in results), shown(
        results
    )
    assert all(isinstance(r, Exception) for r in results[:10]), shown(results)
    for asker in askers:
        assert not asker.is_cached(digest), "nothing partial is committed"
    with requests.get(f"{askers[0].url}/v2/co/repo/blobs/{digest}", timeout=120) as r:
        assert r.status_code == 200 and r.content == data
    assert fake.count("GET", digest) == 2
    assert askers[0].wait_cached([digest], timeout=20) == []
    assert stored_bytes(askers[0], digest) == data
    # A SIGKILLed process cannot abort its own multipart upload; the commit of the same bytes
    # by the retry aborts it, so no multipart upload is left open.
    assert open_uploads(askers[0]) == []


@pytest.mark.parametrize("how", ["stopped", "frozen"])
def test_owner_down_before_the_request_others_fetch_upstream_themselves(
    cluster: Cluster, fake: FakeUpstream, how: str
) -> None:
    # Slow enough (about 0.6 s) that both clients of a replica share its flight.
    digest, data = fake.blob("co/repo", 8 * MiB, chunk=256 * 1024, delay_per_chunk=0.02)
    owner = owner_of(cluster, digest)
    askers = [p for i, p in enumerate(cluster) if i != owner]
    proc = cluster[owner].proc
    assert proc is not None
    if how == "stopped":
        cluster[owner].stop()
    else:
        os.killpg(proc.pid, signal.SIGSTOP)  # accepts connections, never answers
    try:
        started = time.monotonic()
        results = get_many([f"{p.url}/v2/co/repo/blobs/{digest}" for p in askers for _ in (0, 1)])
        wall = time.monotonic() - started
    finally:
        if how == "frozen":
            os.killpg(proc.pid, signal.SIGCONT)
    assert all(r == (200, data) for r in results), shown(results)
    assert fake.count("GET", digest) == 2  # one per live replica, as without peers
    assert [metric(p, "oci_peer_fallbacks_total") for p in askers] == [1.0, 1.0]
    assert wall < (3.0 if how == "stopped" else 12.0), wall
    print(f"owner {how}: 2 upstream GETs, {wall:.2f}s")


def _signed(auth: PeerAuth, proxy: ProxyServer, path: str, query: str, cred: str = "") -> dict:
    audience = canonical_url(proxy.url)
    headers = {AUTH_HEADER: auth.sign(audience, "GET", path, query, cred, "*/*")}
    if cred:
        headers[CREDENTIAL_HEADER] = cred
    return headers


def test_peer_endpoint_refuses_missing_altered_replayed_and_foreign_signatures(
    cluster: Cluster, fake: FakeUpstream, tmp_path: Path
) -> None:
    digest, data = fake.blob("co/repo", 64 * 1024)
    proxy = cluster[owner_of(cluster, digest)]
    auth = PeerAuth(SECRET, str(tmp_path / "nonces"))
    foreign = PeerAuth("another-secret-of-16+chars", str(tmp_path / "nonces2"))
    path = f"/_oci/peer/v1/blob/{digest}"
    query = urlencode({"registry": fake.host, "name": "co/repo"})
    url = f"{proxy.url}{path}?{query}"

    def status(headers: dict, target: str = url) -> int:
        with requests.get(target, headers=headers, timeout=30) as r:
            return r.status_code

    assert status({}) == 401
    assert status({AUTH_HEADER: "v1 t=1 n=" + "0" * 32 + " s=" + "0" * 64}) == 401
    assert status(_signed(foreign, proxy, path, query)) == 401
    other = urlencode({"registry": fake.host, "name": "co/other"})
    assert status(_signed(auth, proxy, path, query), f"{proxy.url}{path}?{other}") == 401
    signed = _signed(auth, proxy, path, query, cred="Basic YWxpY2U6cHc=")
    assert status({**signed, CREDENTIAL_HEADER: "Basic bWFsbG9yeTpwdw=="}) == 401
    elsewhere = cluster[(cluster.index(proxy) + 1) % 3]
    assert status(_signed(auth, proxy, path, query), f"{elsewhere.url}{path}?{query}") == 401
    assert fake.count("GET", digest) == 0, "nothing refused reached upstream"
    good = _signed(auth, proxy, path, query)
    with requests.get(url, headers=good, timeout=30) as r:
        assert r.status_code == 200 and r.content == data
    assert status(good) == 401, "a replayed request is refused"
    assert metric(proxy, "oci_peer_requests_total", outcome="refused") == 6.0
    assert metric(elsewhere, "oci_peer_requests_total", outcome="refused") == 1.0


def test_a_peer_request_is_never_forwarded_again(
    cluster: Cluster, fake: FakeUpstream, tmp_path: Path
) -> None:
    digest, data = fake.blob("co/repo", 4 * MiB)
    owner = owner_of(cluster, digest)
    receiver = cluster[(owner + 1) % 3]  # believes another replica owns the digest
    auth = PeerAuth(SECRET, str(tmp_path / "nonces"))
    path = f"/_oci/peer/v1/blob/{digest}"
    query = urlencode({"registry": fake.host, "name": "co/repo"})
    headers = _signed(auth, receiver, path, query)
    with requests.get(f"{receiver.url}{path}?{query}", headers=headers, timeout=60) as r:
        assert r.status_code == 200 and r.content == data
    assert fake.count("GET", digest) == 1, "the receiver fetched upstream itself"
    for proxy in cluster:
        assert metric(proxy, "oci_peer_fetches_total") == 0.0, "no replica asked another"
    assert metric(cluster[owner], "oci_peer_requests_total") == 0.0


def test_authenticated_mode_across_replicas_serves_no_one_without_their_own_access(
    make_proxy: Callable[..., ProxyServer],
    fake: FakeUpstream,
    seaweed_server: SeaweedFS,
    tmp_path: Path,
) -> None:
    """§15 through peers: the owner fetched a private blob with one client's credential; a
    client without access asking another replica, while the download runs and after it is
    committed, gets upstream's 401 and none of the bytes."""
    digest, data = fake.blob("private/app", 8 * MiB, chunk=256 * 1024, delay_per_chunk=0.05)
    path = f"/v2/private/app/blobs/{digest}"
    fake.responder = bearer_only(path, "good")
    cluster = start_cluster(make_proxy, fake, seaweed_server, tmp_path, PROXY_MODE="authenticated")
    owner = owner_of(cluster, digest)
    asker, stranger_at = [i for i in range(3) if i != owner]
    good = {"Authorization": "Bearer good"}
    pulled: dict[str, object] = {}

    def pull() -> None:
        with requests.get(f"{cluster[asker].url}{path}", headers=good, timeout=60) as r:
            pulled["status"], pulled["body"] = r.status_code, r.content

    puller = threading.Thread(target=pull)
    puller.start()
    deadline = time.monotonic() + 10
    while not any(m == "GET" and p == path for m, p, _ in fake.received):
        assert time.monotonic() < deadline, "the owner never fetched"
        time.sleep(0.02)
    for replica in (stranger_at, owner):  # while the owner's download runs
        for headers in ({}, {"Authorization": "Bearer bad"}):
            r = requests.get(f"{cluster[replica].url}{path}", headers=headers, timeout=60)
            assert r.status_code == 401, (replica, headers, r.status_code)
            assert data[:4096] not in r.content
    puller.join(timeout=60)
    assert pulled.get("status") == 200 and pulled.get("body") == data
    deadline = time.monotonic() + 15
    while (
        not cluster[owner]
        .s3_client()
        .list_objects_v2(Bucket=BUCKET, Prefix=cluster[owner].s3_key(digest))
        .get("KeyCount")
    ):
        assert time.monotonic() < deadline, "never committed"
        time.sleep(0.1)
    for replica in range(3):  # committed: every replica, with and without the credential
        r = requests.get(f"{cluster[replica].url}{path}", timeout=60)
        assert r.status_code == 401, (replica, r.status_code)
        assert data[:4096] not in r.content
        ranged = requests.get(
            f"{cluster[replica].url}{path}", headers={"Range": "bytes=0-99"}, timeout=60
        )
        assert ranged.status_code == 401 and data[:100] not in ranged.content
        with requests.get(f"{cluster[replica].url}{path}", headers=good, timeout=60) as ok:
            assert ok.status_code in (200, 307), (replica, ok.status_code)
    gets_with_access = [
        m
        for m, p, h in fake.received
        if m == "GET" and p == path and h.get("Authorization") == "Bearer good"
    ]
    assert len(gets_with_access) == 1, "the cluster fetched the bytes once"
