"""deploy/helm/oci-pull-through/: rendered by Helm's own Go SDK, validated as Kubernetes objects.

helm-python-sdk binds libhelm (Helm 4's Go SDK) with ctypes: the same template engine,
values coalescing and values.schema.json validation as `helm template`, with no binary.
Every rendered object is checked by kubernetes-validate against the newest Kubernetes
schemas it ships, in strict mode (unknown fields are errors).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "oci-pull-through"
S3_VALUES = CHART / "ci" / "s3-values.yaml"
KUBERNETES = kubernetes_validate.latest_version()
# The Prometheus Operator's CRD: kubernetes-validate has no schema for it.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def _section(text: str, heading: str) -> str:
    """The markdown section that starts with heading, up to the next heading of that level."""
    level = heading.split(" ", 1)[0]
    start = text.index(heading)
    end = re.search(rf"^{level} ", text[start + len(heading) :], re.M)
    return text[start : start + len(heading) + end.start()] if end else text[start:]


def documented_env_names() -> set[str]:
    """Names from the README's configuration table; the repository is the only source.

    A wildcard row (`AWS_*`) documents the names its row lists with that prefix.
    """
    readme = _section((ROOT / "README.md").read_text(), "## Configuration")
    names = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)`", readme, re.M))
    for prefix, row in re.findall(r"^\| `([A-Z][A-Z0-9_]*_)\*` \|(.*)$", readme, re.M):
        names.update(re.findall(rf"`({prefix}[A-Z0-9_]+)`", row))
    assert {"PROXY_MODE", "STORAGE_BACKEND", "FS_ROOT"} <= names, "configuration table not found"
    return names


def render(values: dict[str, Any] | None) -> tuple[list[dict[str, Any]], str]:
    """Every object the chart renders for these values, and NOTES.txt."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values=values, name="cache", namespace="registry", is_install=True)
    notes = ""
    objects: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects, notes


def s3_values() -> dict[str, Any]:
    return yaml.safe_load(S3_VALUES.read_text())


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(objects, "Deployment")
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    return main


def env_of(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container(objects)["env"]}


@pytest.mark.parametrize("variant", ["default", "s3"])
def test_every_rendered_object_is_valid_kubernetes(variant: str) -> None:
    """Strict schema validation of each object against the newest Kubernetes release."""
    objects, _ = render(None if variant == "default" else s3_values())
    assert by_kind(objects, "Deployment") and by_kind(objects, "Service")
    validate_all(objects)


def validate_all(objects: list[dict[str, Any]]) -> None:
    """kubernetes-validate, strict, for every object but the CRD kinds it has no schema for."""
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {error.message}")


@pytest.mark.parametrize("variant", ["default", "s3"])
def test_env_names_are_the_documented_settings(variant: str) -> None:
    """The container gets its configuration as environment, by the README's names only."""
    objects, _ = render(None if variant == "default" else s3_values())
    names = set(env_of(objects))
    assert names <= documented_env_names(), names - documented_env_names()
    assert {"PROXY_MODE", "STORAGE_BACKEND", "LISTEN_ADDR", "TOKEN_SECRET"} <= names


def test_probes_port_and_resources() -> None:
    objects, _ = render(None)
    main = container(objects)
    for probe in ("livenessProbe", "readinessProbe"):
        assert main[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert main["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert env_of(objects)["LISTEN_ADDR"]["value"] == ":8080"
    assert main["resources"]["requests"] and main["resources"]["limits"]["memory"]
    pod = by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    (service,) = by_kind(objects, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"].items() <= pod_labels(objects).items()
    (pdb,) = by_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]


def pod_labels(objects: list[dict[str, Any]]) -> dict[str, str]:
    return by_kind(objects, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]


def test_fs_backend_has_a_claim_mounted_at_fs_root() -> None:
    objects, notes = render(None)
    env = env_of(objects)
    assert env["STORAGE_BACKEND"]["value"] == "fs"
    (claim,) = by_kind(objects, "PersistentVolumeClaim")
    pod = by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in container(objects)["volumeMounts"]}
    assert mounts["cache"] == env["FS_ROOT"]["value"]
    assert by_kind(objects, "Deployment")[0]["spec"]["strategy"]["type"] == "Recreate"
    assert not any(name.startswith(("S3_", "AWS_")) for name in env)
    assert by_kind(objects, "Ingress") == [] and by_kind(objects, "ServiceMonitor") == []
    assert "hosts.toml" in notes and "registry-mirrors" in notes and "[[registry.mirror]]" in notes
    assert "cache-oci-pull-through.registry.svc:8080" in notes


def test_s3_backend_has_no_claim_and_takes_credentials_from_the_secret() -> None:
    objects, notes = render(s3_values())
    env = env_of(objects)
    assert by_kind(objects, "PersistentVolumeClaim") == []
    assert env["STORAGE_BACKEND"]["value"] == "s3"
    assert env["S3_BUCKET"]["value"] == "oci-cache"
    assert env["AWS_ENDPOINT_URL"]["value"].startswith("http://")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "oci-pull-through-s3", "key": name}
    assert env["TOKEN_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "oci-pull-through-token"
    assert by_kind(objects, "Secret") == [], "existing Secrets are referenced, not created"
    (ingress,) = by_kind(objects, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    (monitor,) = by_kind(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels(objects).items()
    (pdb,) = by_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 2, "selector": pdb["spec"]["selector"]}
    assert "https://registry-cache.example.internal" in notes


def test_s3_with_service_account_annotation_and_no_keys() -> None:
    """Workload identity: no key variables at all, the role on the ServiceAccount."""
    values = s3_values()
    values["storage"]["s3"]["credentials"] = {"existingSecret": ""}
    values["serviceAccount"] = {
        "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}
    }
    objects, _ = render(values)
    env = env_of(objects)
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    (account,) = by_kind(objects, "ServiceAccount")
    assert account["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"
    }
    pod = by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]


def test_s3_keys_given_in_values_become_a_secret() -> None:
    values = s3_values()
    values["storage"]["s3"]["credentials"] = {"accessKeyId": "AK", "secretAccessKey": "SK"}
    objects, _ = render(values)
    secrets = {s["metadata"]["name"]: s for s in by_kind(objects, "Secret")}
    assert secrets["cache-oci-pull-through-s3"]["stringData"] == {
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK",
    }
    ref = env_of(objects)["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "cache-oci-pull-through-s3"
    validate_all(objects)


@pytest.mark.parametrize(
    "bad",
    [
        {"proxyMode": "open"},
        {"storage": {"backend": "gcs"}},
        {"env": {"PROXY_MODE": "transparent"}},
        {"env": {"lower_case": "x"}},
        {"unknownKey": 1},
    ],
)
def test_values_schema_rejects_bad_values(bad: dict[str, Any]) -> None:
    """values.schema.json is enforced at render time, as `helm install` does."""
    with pytest.raises(helm.HelmError):
        render(bad)
