"""deploy/helm/oci-pull-through/: rendered by Helm's own Go SDK, validated as Kubernetes objects.

helm-python-sdk binds libhelm (Helm 4's Go SDK) with ctypes: the same template engine,
values coalescing and values.schema.json validation as `helm template`, with no binary.
Every rendered object is checked by kubernetes-validate against the newest Kubernetes
schemas it ships, in strict mode (unknown fields are errors).
"""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from app.config import Config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "oci-pull-through"
S3_VALUES = CHART / "ci" / "s3-values.yaml"
KUBERNETES = kubernetes_validate.latest_version()
# The Prometheus Operator's CRD: kubernetes-validate has no schema for it.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
TOKEN_KEY = "a-stable-token-secret-for-tests"
# The chart's defaults plus the one choice it requires: where TOKEN_SECRET comes from.
MINIMAL: dict[str, Any] = {"tokenSecret": {"value": TOKEN_KEY}}
# Every optional feature switched on, for schema validation and the tests below.
ALL_OPTIONS: dict[str, Any] = {
    "tokenSecret": {"value": TOKEN_KEY},
    "priorityClassName": "registry-critical",
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
        },
        {
            "maxSkew": 2,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"team": "platform"}},
        },
    ],
    "extraVolumes": [{"name": "ca-bundle", "configMap": {"name": "corporate-ca"}}],
    "extraVolumeMounts": [
        {
            "name": "ca-bundle",
            "mountPath": "/etc/ssl/certs/corporate-ca.pem",
            "subPath": "ca.pem",
            "readOnly": True,
        }
    ],
    "spool": {"sizeLimit": "5Gi", "request": "1Gi"},
    "networkPolicy": {
        "enabled": True,
        "ingressFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ci"}}},
            {"ipBlock": {"cidr": "10.0.0.0/16"}},
        ],
        "extraEgress": [
            {
                "to": [{"ipBlock": {"cidr": "10.96.0.0/12"}}],
                "ports": [{"port": 8333, "protocol": "TCP"}],
            }
        ],
    },
    "test": {"pullImage": "ghcr.io/org/app:v1", "platform": "linux/amd64"},
}


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


def values_of(variant: str) -> dict[str, Any]:
    """The values of a named test variant (a fresh copy)."""
    chosen = {"default": MINIMAL, "all-options": ALL_OPTIONS}.get(variant)
    return copy.deepcopy(chosen) if chosen is not None else s3_values()


@pytest.mark.parametrize("variant", ["default", "s3", "all-options"])
def test_every_rendered_object_is_valid_kubernetes(variant: str) -> None:
    """Strict schema validation of each object against the newest Kubernetes release."""
    objects, _ = render(values_of(variant))
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
    objects, _ = render(values_of(variant))
    names = set(env_of(objects))
    assert names <= documented_env_names(), names - documented_env_names()
    assert {"PROXY_MODE", "STORAGE_BACKEND", "LISTEN_ADDR", "TOKEN_SECRET"} <= names


@pytest.mark.parametrize("variant", ["default", "s3"])
def test_rendered_settings_pass_the_apps_own_validation(variant: str) -> None:
    """The plain values the chart sets (LISTEN_ADDR [::]:8080 included) are valid to app.config."""
    objects, _ = render(values_of(variant))
    environ = {k: v["value"] for k, v in env_of(objects).items() if "value" in v}
    environ["TOKEN_SECRET"] = TOKEN_KEY  # from the Secret at run time
    config = Config.from_env(environ)
    assert config.listen_addr == "[::]:8080"


def test_probes_port_and_resources() -> None:
    objects, _ = render(MINIMAL)
    main = container(objects)
    for probe in ("livenessProbe", "readinessProbe"):
        assert main[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert main["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    # IPv6 and IPv4 (a dual-stack socket); IPv4 only where the kernel has no IPv6.
    assert env_of(objects)["LISTEN_ADDR"]["value"] == "[::]:8080"
    v4, _ = render({**MINIMAL, "listenHost": "0.0.0.0"})
    assert env_of(v4)["LISTEN_ADDR"]["value"] == "0.0.0.0:8080"
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
    objects, notes = render(MINIMAL)
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
        {"tokenSecret": {"create": True}},  # the 0.1 key: a random key on every render
        {"listenHost": "10.0.0.1"},
        {"spool": {"sizeLimit": "lots", "request": "1Gi"}},
        {"networkPolicy": {"egressPorts": [0]}},
        {"topologySpreadConstraints": [{"maxSkew": 1}]},
    ],
)
def test_values_schema_rejects_bad_values(bad: dict[str, Any]) -> None:
    """values.schema.json is enforced at render time, as `helm install` does."""
    with pytest.raises(helm.HelmError):
        render(bad)


def test_token_secret_must_be_chosen_and_renders_stably() -> None:
    """No random key by default: every render of the same values is the same (Argo CD, Flux)."""
    with pytest.raises(helm.HelmError, match="tokenSecret.existingSecret") as refused:
        render(None)
    assert "helm template" in str(refused.value) and "tokenSecret.value" in str(refused.value)
    with pytest.raises(helm.HelmError, match="exactly one"):
        render({"tokenSecret": {"existingSecret": "mine", "value": TOKEN_KEY}})
    with pytest.raises(helm.HelmError):  # values.schema.json: a key of 16+ characters
        render({"tokenSecret": {"value": "short"}})

    first, second = render(MINIMAL), render(MINIMAL)
    assert first == second, "two renders of the same values are identical"
    secrets = {s["metadata"]["name"]: s for s in by_kind(first[0], "Secret")}
    secret = secrets["cache-oci-pull-through-token"]
    assert secret["data"] == {"TOKEN_SECRET": base64.b64encode(TOKEN_KEY.encode()).decode()}
    ref = env_of(first[0])["TOKEN_SECRET"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "cache-oci-pull-through-token", "key": "TOKEN_SECRET"}

    existing = {"tokenSecret": {"existingSecret": "registry-token"}}
    objects, _ = render(existing)
    assert render(existing)[0] == objects
    assert by_kind(objects, "Secret") == []
    ref = env_of(objects)["TOKEN_SECRET"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "registry-token", "key": "TOKEN_SECRET"}

    # generate is the opt-in for helm install/upgrade: without a cluster (helm template) the
    # lookup finds nothing, so each render makes a new key. That is why it is not the default.
    generated = [render({"tokenSecret": {"generate": True}})[0] for _ in range(2)]
    keys = [by_kind(objects, "Secret")[0]["data"]["TOKEN_SECRET"] for objects in generated]
    assert len(base64.b64decode(keys[0])) == 48 and keys[0] != keys[1]


@pytest.mark.parametrize("replicas", [2, 3])
def test_fs_backend_refuses_more_than_one_replica(replicas: int) -> None:
    """Several pods on one ReadWriteOnce claim would fight over it: the chart refuses."""
    with pytest.raises(helm.HelmError, match="ReadWriteOnce") as refused:
        render({**MINIMAL, "replicaCount": replicas})
    assert f"replicaCount={replicas}" in str(refused.value) and "s3" in str(refused.value)
    for allowed in (0, 1):
        objects, _ = render({**MINIMAL, "replicaCount": allowed})
        assert by_kind(objects, "Deployment")[0]["spec"]["replicas"] == allowed
    values = s3_values()
    values["replicaCount"] = replicas
    objects, _ = render(values)  # s3: the replicas share a bucket
    assert by_kind(objects, "Deployment")[0]["spec"]["replicas"] == replicas


def test_spool_has_a_size_limit_and_an_ephemeral_storage_request() -> None:
    """The spool's emptyDir is bounded and the scheduler reserves room for it."""
    objects, _ = render(MINIMAL)
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "20Gi"}
    mounts = {m["name"]: m["mountPath"] for m in container(objects)["volumeMounts"]}
    assert mounts["tmp"] == "/tmp"  # SPOOL_DIR's default lives under the temp directory
    requests = container(objects)["resources"]["requests"]
    assert requests == {"cpu": "250m", "memory": "256Mi", "ephemeral-storage": "2Gi"}

    objects, _ = render(ALL_OPTIONS)
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "5Gi"}
    assert container(objects)["resources"]["requests"]["ephemeral-storage"] == "1Gi"
    own = {**MINIMAL, "resources": {"requests": {"ephemeral-storage": "8Gi"}}}
    objects, _ = render(own)
    assert container(objects)["resources"]["requests"]["ephemeral-storage"] == "8Gi"
    validate_all(objects)


def test_network_policy_admits_only_the_listed_clients() -> None:
    """Ingress to the cache port from the chosen peers and the test pod; egress DNS, 443, 80."""
    assert by_kind(render(MINIMAL)[0], "NetworkPolicy") == [], "off unless enabled"
    objects, notes = render(ALL_OPTIONS)
    (policy,) = by_kind(objects, "NetworkPolicy")
    (service,) = by_kind(objects, "Service")
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": service["spec"]["selector"]}
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    (test_pod,) = by_kind(objects, "Pod")
    test_peer, *peers = rule["from"]
    assert test_peer["podSelector"]["matchLabels"].items() <= test_pod["metadata"]["labels"].items()
    assert peers == ALL_OPTIONS["networkPolicy"]["ingressFrom"]
    dns, web, extra = spec["egress"]
    assert dns == {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    assert web == {"ports": [{"port": 443, "protocol": "TCP"}, {"port": 80, "protocol": "TCP"}]}
    assert extra == ALL_OPTIONS["networkPolicy"]["extraEgress"][0]
    assert "the NetworkPolicy admits only" in notes
    default_peers = render({**MINIMAL, "networkPolicy": {"enabled": True}})[0]
    (policy,) = by_kind(default_peers, "NetworkPolicy")
    assert policy["spec"]["ingress"][0]["from"][1:] == [{"podSelector": {}}], "own namespace"
    validate_all(default_peers)


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]


def test_scheduling_options_and_extra_volumes() -> None:
    """priorityClassName, topologySpreadConstraints (own labels filled in), a CA bundle."""
    objects, _ = render(ALL_OPTIONS)
    pod = pod_spec(objects)
    assert pod["priorityClassName"] == "registry-critical"
    zone, host = pod["topologySpreadConstraints"]
    assert zone["labelSelector"] == {
        "matchLabels": by_kind(objects, "Service")[0]["spec"]["selector"]
    }
    assert host["labelSelector"] == {"matchLabels": {"team": "platform"}}, "given ones are kept"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["ca-bundle"] == {"name": "ca-bundle", "configMap": {"name": "corporate-ca"}}
    mounts = {m["name"]: m for m in container(objects)["volumeMounts"]}
    assert mounts["ca-bundle"]["mountPath"] == "/etc/ssl/certs/corporate-ca.pem"
    assert {"tmp", "cache"} <= set(mounts), "the chart's own mounts stay"
    plain = pod_spec(render(MINIMAL)[0])
    assert "priorityClassName" not in plain and "topologySpreadConstraints" not in plain


def test_helm_test_pod_pulls_through_the_release() -> None:
    """`helm test`: /healthz of the Service, then `warm` pulls an image through it."""
    objects, notes = render(ALL_OPTIONS)
    (pod,) = by_kind(objects, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (service,) = by_kind(objects, "Service")
    assert not service["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), (
        "the Service must not send clients to the test pod"
    )
    (check,) = pod["spec"]["containers"]
    assert check["image"] == container(objects)["image"], "the chart's own image"
    env = {e["name"]: e["value"] for e in check["env"]}
    url = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert env == {"CACHE_URL": url, "PULL_IMAGE": "ghcr.io/org/app:v1"}
    script = check["command"][-1]
    assert check["command"][:2] == ["sh", "-c"]
    assert "'/healthz'" in script
    assert 'oci-pull-through warm --json --proxy "$CACHE_URL" "$PULL_IMAGE"' in script
    assert script.endswith('--platform "linux/amd64"')
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "helm test -n registry cache" in notes
    objects, _ = render({**MINIMAL, "test": {"enabled": False}})
    assert by_kind(objects, "Pod") == []


def test_upstream_auth_mounts_the_dockerconfigjson_secret() -> None:
    """upstreamAuth.existingSecret: a directory mount (Secret updates reach the file)."""
    values = copy.deepcopy(MINIMAL)
    values["upstreamAuth"] = {"existingSecret": "hub-pull"}
    objects, _ = render(values)
    validate_all(objects)
    env = env_of(objects)
    assert env["UPSTREAM_AUTH_FILE"]["value"] == (
        "/etc/oci-pull-through/upstream-auth/.dockerconfigjson"
    )
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert volumes["upstream-auth"]["secret"] == {
        "secretName": "hub-pull",
        "items": [{"key": ".dockerconfigjson", "path": ".dockerconfigjson"}],
    }
    mounts = {m["name"]: m for m in container(objects)["volumeMounts"]}
    assert mounts["upstream-auth"] == {
        "name": "upstream-auth",
        "mountPath": "/etc/oci-pull-through/upstream-auth",
        "readOnly": True,
    }
    assert "subPath" not in mounts["upstream-auth"]
    plain = render(MINIMAL)[0]
    assert "UPSTREAM_AUTH_FILE" not in env_of(plain)
    assert "upstream-auth" not in {v["name"] for v in pod_spec(plain)["volumes"]}
