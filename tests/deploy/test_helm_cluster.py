"""The chart wires replicas on S3 into one cluster (issue 13): headless Service, PEERS_DNS."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from test_helm_chart import (
    TOKEN_KEY,
    by_kind,
    env_of,
    render,
    s3_values,
    validate_all,
)

from app.config import Config


def _values(**changes: Any) -> dict[str, Any]:
    values = copy.deepcopy(s3_values())
    values.update(changes)
    return values


def test_replicas_on_s3_get_a_headless_service_and_peer_settings() -> None:
    objects, _ = render(_values(replicaCount=3))
    validate_all(objects)
    services = {s["metadata"]["name"]: s for s in by_kind(objects, "Service")}
    peers = services["cache-oci-pull-through-peers"]
    assert peers["spec"]["clusterIP"] == "None"
    env = env_of(objects)
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["PEER_URL"]["value"] == "http://$(POD_IP):8080"
    assert env["PEERS_DNS"]["value"] == "cache-oci-pull-through-peers.registry.svc:8080"
    ref = env["CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"]
    assert ref == env["TOKEN_SECRET"]["valueFrom"]["secretKeyRef"], "the token secret by default"
    environ = {k: v["value"] for k, v in env.items() if "value" in v}
    environ.update(TOKEN_SECRET=TOKEN_KEY, CLUSTER_SECRET=TOKEN_KEY)
    environ["PEER_URL"] = "http://10.1.2.3:8080"  # as the kubelet expands $(POD_IP)
    config = Config.from_env(environ)
    assert config.peers_dns and config.peer_secret == TOKEN_KEY


def test_cluster_secret_from_its_own_secret() -> None:
    objects, _ = render(_values(replicaCount=2, cluster={"existingSecret": "peer-key"}))
    ref = env_of(objects)["CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "peer-key", "key": "CLUSTER_SECRET"}


@pytest.mark.parametrize(
    "changes", [{"replicaCount": 1}, {"replicaCount": 3, "cluster": {"enabled": False}}]
)
def test_no_cluster_for_one_replica_or_when_disabled(changes: dict[str, Any]) -> None:
    objects, _ = render(_values(**changes))
    assert "PEERS_DNS" not in env_of(objects)
    assert len(by_kind(objects, "Service")) == 1


def test_network_policy_admits_the_other_replicas() -> None:
    objects, _ = render(_values(replicaCount=3, networkPolicy={"enabled": True}))
    (policy,) = by_kind(objects, "NetworkPolicy")
    sources = policy["spec"]["ingress"][0]["from"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert {"podSelector": {"matchLabels": selector}} in sources
