"""/metrics in-process; totals across gunicorn workers: tests/e2e/test_ops_metrics.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import responses
from flask import Flask

from app import create_app
from app.config import TRANSPARENT, Config

REG = "registry.test"
BLOB = b"metric bytes " * 500
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


def _app(tmp_path: Path, **settings: object) -> Flask:
    config = Config(
        proxy_mode=TRANSPARENT,
        storage_backend="fs",
        fs_root=str(tmp_path / "cache"),
        upstream_registry=REG,
        **settings,  # type: ignore[arg-type]
    )
    return create_app(config)


def _value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = (
                dict(
                    part.split("=", 1)
                    for part in line[line.find("{") + 1 : line.find("}")].split(",")
                )
                if "{" in line
                else {}
            )
            if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_hits_misses_and_bytes_are_counted(tmp_path: Path) -> None:
    app = _app(tmp_path)
    client = app.test_client()
    labels = {"kind": "blob", "method": "GET", "status": "200"}
    before = client.get("/metrics").get_data(as_text=True)
    with responses.RequestsMock() as mock:
        mock.get(
            f"https://{REG}/v2/org/app/blobs/{DIGEST}",
            body=BLOB,
            headers={"Content-Length": str(len(BLOB)), "Docker-Content-Digest": DIGEST},
        )
        for _ in range(4):
            response = client.get(f"/v2/org/app/blobs/{DIGEST}")
            assert response.get_data() == BLOB
            response.close()
    after = client.get("/metrics")
    assert after.status_code == 200 and after.content_type.startswith("text/plain")
    text = after.get_data(as_text=True)
    delta = lambda name, **lb: _value(text, name, **lb) - _value(before, name, **lb)  # noqa: E731
    assert delta("oci_requests_total", cache="miss", **labels) == 1
    assert delta("oci_requests_total", cache="hit", **labels) == 3
    assert delta("oci_served_bytes_total", source="cache") == 3 * len(BLOB)
    assert delta("oci_served_bytes_total", source="upstream") == len(BLOB)
    assert delta("oci_cache_commits_total", kind="blob") == 1
    assert delta("oci_upstream_requests_total", registry=REG, status="200") == 1
    assert delta("oci_upstream_request_duration_seconds_count", registry=REG, status="200") == 1
    assert "oci_transfers_in_flight" in text and "oci_fs_cache_bytes" in text


def test_metrics_can_be_switched_off(tmp_path: Path) -> None:
    assert _app(tmp_path, metrics_enabled=False).test_client().get("/metrics").status_code == 404


def test_the_grafana_dashboard_queries_only_metrics_we_export(tmp_path: Path) -> None:
    import json
    import re

    from app import metrics

    exported = {m.name for m in metrics.REGISTRY.collect()}
    samples = {s.name for m in metrics.REGISTRY.collect() for s in m.samples}
    dashboard = Path(__file__).parents[2] / "deploy" / "grafana" / "oci-pull-through.json"
    doc = json.loads(dashboard.read_text())
    used = {
        name
        for panel in doc["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\boci_[a-z_]+", target["expr"])
    }
    titles = " ".join(panel["title"].lower() for panel in doc["panels"])
    assert all(words in titles for words in ("hit ratio", "bytes saved", "latency", "in flight"))
    unknown = {n for n in used if n not in samples and n.removesuffix("_total") not in exported}
    assert not unknown and len(used) >= 8, unknown
