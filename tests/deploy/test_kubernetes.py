"""deploy/kubernetes: every overlay builds with kustomize, validates strictly against the
Kubernetes schemas, and keeps the properties production relies on.

kubernetes-validate has no schema for the Prometheus Operator's ServiceMonitor (a CRD), so every
other document is validated strictly and the ServiceMonitor's structure is checked by hand.
"""

from __future__ import annotations

import base64
import copy
import json
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE_ROOT = REPO_ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu-dev", "gpu")
# Oldest and newest Kubernetes minors the manifests are checked against.
K8S_VERSIONS = ("1.29.0", "1.37.0")
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# SOFTPROMPT_* names the manifests set before the server's Settings has them (graceful drain).
PENDING_SETTINGS = {"drain_timeout_s"}

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl not found: run .ci/system-deps (installs kubectl where it is missing)")


def kustomize(directory: Path) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict]]:
    return {name: kustomize(KUSTOMIZE_ROOT / "overlays" / name) for name in OVERLAYS}


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def server_container(docs: list[dict]) -> dict:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["server"]
    return containers[0]


def config(docs: list[dict]) -> dict[str, str]:
    """The ConfigMap the server container reads through envFrom (hash-suffixed name)."""
    refs = [e["configMapRef"]["name"] for e in server_container(docs)["envFrom"]]
    maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    assert len(refs) == 1 and refs[0] in maps, (refs, list(maps))
    return maps[refs[0]]


def strict_validate(doc: dict) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_document_validates_strictly(built, overlay):
    kinds = sorted(d["kind"] for d in built[overlay])
    expected = {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget",
                "HorizontalPodAutoscaler", "ServiceMonitor"}
    assert expected <= set(kinds), kinds
    for doc in built[overlay]:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        strict_validate(doc)


def test_examples_validate_strictly():
    for path in sorted((KUSTOMIZE_ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            strict_validate(doc)


def test_strict_validation_rejects_a_misspelled_field(built):
    """Guards the test itself: a typo must not slip through as an unknown field."""
    deployment = copy.deepcopy(one(built["gpu"], "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        strict_validate(deployment)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_scrapes_the_service_metrics_port(built, overlay):
    docs = built[overlay]
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    allowed = {"port", "path", "scheme", "interval", "scrapeTimeout"}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= allowed, set(endpoint) - allowed
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        assert endpoint["scheme"] == "http"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_readyz_and_healthz_on_the_server_port(built, overlay):
    container = server_container(built[overlay])
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in ports
    assert ports["http"] == int(config(built[overlay])["SOFTPROMPT_PORT"])
    # The startup probe must allow a slow model load before liveness can kill the pod.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_is_locked_down_with_writable_volumes_where_needed(built, overlay):
    docs = built[overlay]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    container = server_container(docs)
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"

    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    settings = config(docs)
    for writable in ("/tmp", settings["SOFTPROMPT_MODEL_CACHE"], settings["SOFTPROMPT_STORE"]):
        assert writable in mounts and not mounts[writable].get("readOnly", False), writable
    assert settings["HF_HOME"].startswith(settings["SOFTPROMPT_MODEL_CACHE"] + "/")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(volumes) == {m["name"] for m in container["volumeMounts"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_keys_secret_is_mounted_where_the_setting_points(built, overlay):
    docs = built[overlay]
    key_path = Path(config(docs)["SOFTPROMPT_API_KEYS"])
    container = server_container(docs)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(key_path.parent))
    assert mount["readOnly"] is True
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    secret = secrets[volume["secret"]["secretName"]]
    keys = json.loads(base64.b64decode(secret["data"][key_path.name]))
    assert keys["tenants"] and all(t["keys"] for t in keys["tenants"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_settings_are_real_server_settings_with_valid_values(built, overlay, tmp_path):
    values = {}
    for name, value in config(built[overlay]).items():
        if not name.startswith("SOFTPROMPT_"):
            continue
        field = name.removeprefix("SOFTPROMPT_").lower()
        if field in PENDING_SETTINGS and field not in Settings.model_fields:
            continue
        assert field in Settings.model_fields, f"{name} is not a setting (silently ignored)"
        values[field] = value
    keys = tmp_path / "api-keys.json"
    keys.write_text("{}")
    values["api_keys"] = str(keys)  # the mounted Secret, which only exists in the pod
    Settings(**values)  # raises on an invalid value (device, dtype, sizes, ...)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_prestop_and_drain(built, overlay):
    docs = built[overlay]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    prestop = server_container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sleep"
    drain = float(config(docs)["SOFTPROMPT_DRAIN_TIMEOUT_S"])
    assert drain > 0
    assert pod["terminationGracePeriodSeconds"] > int(prestop[1]) + drain


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(built, overlay):
    resources = server_container(built[overlay])["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind


def test_gpu_is_requested_only_in_the_gpu_overlay(built):
    gpu = server_container(built["gpu"])["resources"]
    assert str(gpu["requests"]["nvidia.com/gpu"]) == str(gpu["limits"]["nvidia.com/gpu"]) == "1"
    pod = one(built["gpu"], "Deployment")["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["nodeSelector"]
    assert config(built["gpu"])["SOFTPROMPT_DEVICE"] == "cuda"
    assert not config(built["gpu"])["SOFTPROMPT_MODEL"].startswith("builtin:")

    assert "nvidia.com/gpu" not in yaml.safe_dump_all(built["cpu-dev"])
    assert config(built["cpu-dev"])["SOFTPROMPT_DEVICE"] == "cpu"
    assert config(built["cpu-dev"])["SOFTPROMPT_MODEL"] == "builtin:tiny"


def test_adapter_store_is_emptydir_in_dev_and_a_shared_claim_on_gpu(built):
    def store_volume(docs: list[dict]) -> dict:
        container = server_container(docs)
        store = config(docs)["SOFTPROMPT_STORE"]
        name = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == store)
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        return next(v for v in pod["volumes"] if v["name"] == name)

    assert set(store_volume(built["cpu-dev"])) == {"name", "emptyDir"}
    gpu_volume = store_volume(built["gpu"])
    assert set(gpu_volume) == {"name", "persistentVolumeClaim"}
    claim = one(built["gpu"], "PersistentVolumeClaim")
    assert gpu_volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_the_deployment_on_queue_depth(built, overlay):
    docs = built[overlay]
    hpa, deployment = one(docs, "HorizontalPodAutoscaler"), one(docs, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == \
        ("apps/v1", "Deployment", deployment["metadata"]["name"])
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "softprompt_queue_depth"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # The HPA owns the replica count; a replicas field would reset it on every apply.
    assert "replicas" not in deployment["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_and_pdb_select_the_deployments_pods(built, overlay):
    docs = built[overlay]
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service, pdb = one(docs, "Service"), one(docs, "PodDisruptionBudget")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in server_container(docs)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    # maxUnavailable (not minAvailable): a single dev replica must not block node drains.
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]


def test_a_gpu_rollout_needs_no_spare_gpu(built):
    """Every GPU of the pool may be taken by a replica: a rollout must stop an old pod before
    it starts a new one (no surge), and still keep a replica serving (the HPA's floor)."""
    strategy = one(built["gpu"], "Deployment")["spec"]["strategy"]
    if strategy["type"] == "RollingUpdate":
        rolling = strategy["rollingUpdate"]
        assert rolling["maxSurge"] == 0 and rolling["maxUnavailable"] >= 1, rolling
    else:
        assert strategy["type"] == "Recreate"
    assert one(built["gpu"], "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2


def test_the_gpu_overlay_sets_max_model_len_below_the_models_context(built):
    """As the README advises: the KV slots hold the longest request, not the whole context."""
    max_len = int(config(built["gpu"])["SOFTPROMPT_MAX_MODEL_LEN"])
    assert 0 < max_len < 32768  # Qwen2.5's context
