"""deploy/k8s: the Kustomize base and its gpu and cpu overlays, rendered, validated against the Kubernetes
API schemas, and checked against the service they run.

- Rendering: ``render()`` below is a small Kustomize renderer limited to the features deploy/k8s uses (it
  refuses any other), because kustomize is on neither PyPI nor Debian (bookworm's kubernetes-client 1.20
  embeds kustomize v2, too old for these files), so a fresh CI machine may have no renderer. Where
  ``kubectl`` or ``kustomize`` is installed (our machines' kubectl 1.32 embeds kustomize v5.5), a test
  renders each overlay with it too and requires the same objects, so the renderer cannot drift unnoticed.
- Validation: every core object by ``kubernetes-validate`` (the Kubernetes OpenAPI schemas, strict: an
  unknown field fails) for the oldest version the manifests claim (1.30: the preStop sleep action) and
  the newest the package knows. It has no schema for the Prometheus Operator's ServiceMonitor (a CRD):
  that one is parsed by the models that cloudcoil-models-prometheus-operator generates from the
  operator's CRD schemas, and must come back unchanged (no field dropped as unknown).
- Against the service: the ConfigMap's settings load in ``service.settings.Settings``; the service runs
  as the manifest's user on a read-only root filesystem with only the manifest's volumes writable (a
  private mount namespace); and the shutdown under a full queue, measured, fits in the grace period.
  On a GPU (``make test-gpu``), the gpu overlay's pod the same way, under load, with a cold Triton cache.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from safetensors.numpy import save as save_safetensors

from tests.deploy.conftest import ROOT, free_port, send_traffic, stop, wait_http

K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = {name: K8S / "overlays" / name for name in ("gpu", "cpu")}
ADAPTER_RULES = K8S / "autoscaling" / "prometheus-adapter-rules.yaml"
# The oldest Kubernetes the manifests claim (lifecycle.preStop.sleep is on by default from 1.30), and
# the newest whose schemas kubernetes-validate carries.
OLDEST_KUBERNETES = "1.30.0"


# ---- a Kustomize renderer for what deploy/k8s uses ------------------------------------------------------


class Unsupported(Exception):
    """A kustomization uses a feature this renderer does not implement."""


_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "configMapGenerator", "images", "patches"}


def _load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _env_file(path: Path) -> dict[str, str]:
    """Kustomize's env file: KEY=VALUE lines, '#' comments and blank lines skipped, the value verbatim."""
    data = {}
    for line in path.read_text().splitlines():
        line = line.lstrip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise Unsupported(f"{path}: {line!r} takes its value from the environment")
        key, value = line.split("=", 1)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
            raise ValueError(f"{path}: invalid key {key!r}")
        data[key] = value
    return data


def _generator_data(directory: Path, generator: dict) -> dict[str, str]:
    unknown = set(generator) - {"name", "envs", "literals", "behavior"}
    if unknown:
        raise Unsupported(f"configMapGenerator fields {sorted(unknown)}")
    data: dict[str, str] = {}
    for env in generator.get("envs", []):
        data.update(_env_file(directory / env))
    for literal in generator.get("literals", []):
        key, value = literal.split("=", 1)
        data[key] = value
    return data


def _go_json(value: object) -> str:
    """encoding/json.Marshal of maps of strings: keys sorted, no spaces, <, > and & escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def configmap_hash(data: dict[str, str]) -> str:
    """Kustomize's name suffix (api/hasher): sha256 of the JSON of kind, name and data, its first 10 hex
    digits with 0, 1, 3, a and e swapped for letters. The name enters empty: kustomize looks it up as
    one field called "metadata/name", which no object has (what kustomize v5.5 prints agrees)."""
    digest = hashlib.sha256(_go_json({"data": data, "kind": "ConfigMap", "name": ""}).encode()).hexdigest()
    return digest[:10].translate(str.maketrans("013ae", "ghkmt"))


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def json6902(document: dict, operations: list[dict]) -> dict:
    """RFC 6902 add, replace and remove (the ops the overlays use)."""
    document = copy.deepcopy(document)
    for operation in operations:
        *parents, last = _pointer(operation["path"])
        node = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        op = operation["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if op == "add":
                node.insert(index, copy.deepcopy(operation["value"]))
            elif op == "replace":
                node[index] = copy.deepcopy(operation["value"])
            elif op == "remove":
                del node[index]
            else:
                raise Unsupported(f"JSON patch op {op!r}")
        else:
            if op in ("replace", "remove") and last not in node:
                raise KeyError(f"{operation['path']}: nothing to {op}")
            if op in ("add", "replace"):
                node[last] = copy.deepcopy(operation["value"])
            elif op == "remove":
                del node[last]
            else:
                raise Unsupported(f"JSON patch op {op!r}")
    return document


def _matches(document: dict, target: dict) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name"}
    if unknown:
        raise Unsupported(f"patch target fields {sorted(unknown)}")
    group, _, version = document["apiVersion"].rpartition("/")
    return (
        target.get("kind", document["kind"]) == document["kind"]
        and target.get("name", document["metadata"]["name"]) == document["metadata"]["name"]
        and target.get("group", group) == group
        and target.get("version", version) == version
    )


def _set_image(container: dict, images: list[dict]) -> None:
    """The images transformer for name[:tag] references (no registry port, no digest: not used here)."""
    name, _, tag = container["image"].partition(":")
    if "@" in container["image"] or "/" in tag:
        raise Unsupported(f"image reference {container['image']!r}")
    for image in images:
        if image["name"] == name:
            unknown = set(image) - {"name", "newName", "newTag"}
            if unknown:
                raise Unsupported(f"images fields {sorted(unknown)}")
            tag = image.get("newTag", tag)
            container["image"] = image.get("newName", name) + (f":{tag}" if tag else "")


def _build(directory: Path) -> tuple[list[dict], dict[str, dict]]:
    """(objects, generated ConfigMaps by name) of one kustomization, names not yet hashed."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _KUSTOMIZATION_FIELDS
    if unknown:
        raise Unsupported(f"{directory}: kustomization fields {sorted(unknown)}")
    objects: list[dict] = []
    generated: dict[str, dict] = {}
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            sub_objects, sub_generated = _build(path)
            objects.extend(sub_objects)
            generated.update(sub_generated)
        else:
            objects.extend(_load_docs(path))
    for generator in kustomization.get("configMapGenerator", []):
        name, behavior = generator["name"], generator.get("behavior", "create")
        data = _generator_data(directory, generator)
        if behavior == "create":
            if name in generated:
                raise ValueError(f"{directory}: ConfigMap {name} generated twice")
            configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
            generated[name] = configmap
            objects.append(configmap)
        elif behavior == "merge":
            generated[name]["data"].update(data)
        else:
            raise Unsupported(f"configMapGenerator behavior {behavior!r}")
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path", "target"}:
            raise Unsupported(f"patch {patch}: only path + target (JSON 6902) is implemented")
        operations = yaml.safe_load((directory / patch["path"]).read_text())
        if not isinstance(operations, list):
            raise Unsupported(f"{patch['path']}: a strategic merge patch")
        hits = [i for i, obj in enumerate(objects) if _matches(obj, patch["target"])]
        if not hits:
            raise ValueError(f"{directory}: patch {patch['path']} matches nothing")
        for i in hits:
            patched = json6902(objects[i], operations)
            objects[i] = patched
    for obj in objects:
        template = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in template.get("containers", []) + template.get("initContainers", []):
            _set_image(container, kustomization.get("images", []))
    return objects, {name: obj for name, obj in generated.items()}


def render(directory: Path) -> list[dict]:
    """The objects `kustomize build directory` prints (in another order)."""
    objects, generated = _build(directory)
    # The generated ConfigMaps' final names, and the references to them in pod templates.
    names = {}
    for name in generated:
        # The object in `objects` may be a patched copy: hash what is rendered.
        rendered = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name)
        names[name] = f"{name}-{configmap_hash(rendered['data'])}"
        rendered["metadata"]["name"] = names[name]
    for obj in objects:
        spec = obj.get("spec", {}).get("template", {}).get("spec")
        if not spec:
            continue
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    ref = source["configMapRef"]
                    ref["name"] = names.get(ref["name"], ref["name"])
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    ref["name"] = names.get(ref["name"], ref["name"])
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                volume["configMap"]["name"] = names.get(volume["configMap"]["name"], volume["configMap"]["name"])
    return objects


def by_kind(objects: list[dict]) -> dict[str, dict]:
    out = {}
    for obj in objects:
        assert obj["kind"] not in out, f"two {obj['kind']} objects"
        out[obj["kind"]] = obj
    return out


def container(objects: list[dict]) -> dict:
    (only,) = by_kind(objects)["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def pod_env(objects: list[dict]) -> dict[str, str]:
    """The ISOQUANT_* environment a pod gets from its ConfigMap (the Secret's key left out)."""
    kinds = by_kind(objects)
    env: dict[str, str] = {}
    for source in container(objects).get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert kinds["ConfigMap"]["metadata"]["name"] == name
        env.update(kinds["ConfigMap"]["data"])
    for item in container(objects).get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {"base": render(BASE), **{name: render(path) for name, path in OVERLAYS.items()}}


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


@pytest.mark.skipif(_kustomize_command() is None, reason="neither kustomize nor kubectl is installed")
@pytest.mark.parametrize("name", ["base", "gpu", "cpu"])
def test_the_renderer_agrees_with_kustomize(name, rendered):
    directory = BASE if name == "base" else OVERLAYS[name]
    result = subprocess.run([*_kustomize_command(), str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # Deprecated fields would warn here, and a later kustomize drop them.
    assert "deprecated" not in result.stderr.lower(), result.stderr
    real = {_key(obj): obj for obj in _load_docs_text(result.stdout)}
    ours = {_key(obj): obj for obj in rendered[name]}
    assert sorted(ours) == sorted(real)
    for key in real:
        assert ours[key] == real[key], key


def _load_docs_text(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def test_the_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(Unsupported):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [../base]\npatches:\n  - path: p.yaml\n    target: {kind: Deployment}\n"
    )
    shutil.copytree(BASE, tmp_path.parent / "base", dirs_exist_ok=True)
    (tmp_path / "p.yaml").write_text("spec:\n  template: {}\n")  # a strategic merge patch
    with pytest.raises(Unsupported):
        render(tmp_path)


def test_configmap_hash_is_kustomizes():
    # kubectl kustomize (kustomize v5.5.0) named a generator of the literals A=1 and B=<&> so (the HTML
    # characters are escaped in Go's JSON before hashing).
    assert configmap_hash({"A": "1", "B": "<&>"}) == "6mggc5fd49"
    assert configmap_hash({"B": "<&>", "A": "1"}) == "6mggc5fd49"
    assert configmap_hash({"A": "2", "B": "<&>"}) != "6mggc5fd49"


# ---- schema validation ----------------------------------------------------------------------------------


def _kubernetes_versions() -> list[str]:
    try:
        import kubernetes_validate
    except ImportError:  # the dev extra is not installed: the validation tests fail on the import, not collection
        return [OLDEST_KUBERNETES]
    return [OLDEST_KUBERNETES, kubernetes_validate.latest_version()]


def validate(obj: dict, version: str) -> None:
    """Kubernetes' OpenAPI schema (strict) for core objects, the operator's CRD models for ServiceMonitor."""
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        validate_service_monitor(obj)
        return
    import kubernetes_validate

    kubernetes_validate.validate(obj, version, strict=True)


def validate_service_monitor(obj: dict) -> None:
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    model = ServiceMonitor.model_validate(obj)
    back = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    # The models ignore fields they do not know: a field lost on the way back was unknown to the CRD.
    assert back == obj, f"ServiceMonitor fields not in the CRD schema: {_diff(obj, back)}"


def _diff(a: object, b: object, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in set(a) | set(b):
            out += _diff(a.get(key), b.get(key), f"{path}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


@pytest.mark.parametrize("version", _kubernetes_versions())
@pytest.mark.parametrize("name", ["base", "gpu", "cpu"])
def test_manifests_pass_schema_validation(name, version, rendered):
    kinds = sorted(obj["kind"] for obj in rendered[name])
    expected = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    expected.append("ServiceMonitor")
    assert kinds == sorted(expected + (["PersistentVolumeClaim"] if name == "gpu" else []))
    for obj in rendered[name]:
        validate(obj, version)


def test_schema_validation_can_fail(rendered):
    """The validators above reject what a cluster would: an unknown field, a wrong type, and a field the
    oldest claimed version does not have yet."""
    import kubernetes_validate

    deployment = copy.deepcopy(by_kind(rendered["gpu"])["Deployment"])
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, OLDEST_KUBERNETES, strict=True)
    deployment = copy.deepcopy(by_kind(rendered["gpu"])["Deployment"])
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, OLDEST_KUBERNETES, strict=True)
    # The preStop sleep action arrived in 1.29: 1.28's schema refuses it (why 1.30 is the oldest claimed).
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(by_kind(rendered["gpu"])["Deployment"], "1.28.0", strict=True)
    monitor = copy.deepcopy(by_kind(rendered["gpu"])["ServiceMonitor"])
    monitor["spec"]["endpoints"][0]["scrapeIntervall"] = "5s"
    with pytest.raises(AssertionError, match="scrapeIntervall"):
        validate_service_monitor(monitor)
    monitor = copy.deepcopy(by_kind(rendered["gpu"])["ServiceMonitor"])
    monitor["spec"]["endpoints"][0]["port"] = {"name": "http"}
    with pytest.raises(Exception, match="validation error"):
        validate_service_monitor(monitor)


# ---- what the manifests say -----------------------------------------------------------------------------


def test_gpu_pods_request_one_gpu_and_cpu_pods_none(rendered):
    gpu = container(rendered["gpu"])["resources"]
    assert gpu["requests"]["nvidia.com/gpu"] == gpu["limits"]["nvidia.com/gpu"] == "1"
    for name in ("cpu", "base"):
        resources = container(rendered[name])["resources"]
        assert not any("gpu" in key for part in resources.values() for key in part), name
    for name in ("gpu", "cpu"):
        resources = container(rendered[name])["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"], name
    assert pod_env(rendered["gpu"])["ISOQUANT_DEVICE"] == "cuda"
    assert pod_env(rendered["cpu"])["ISOQUANT_DEVICE"] == "cpu"
    assert container(rendered["gpu"])["image"] == "isoquant-service:gpu"
    assert container(rendered["cpu"])["image"] == "isoquant-service:cpu"
    # torch's threads on a CPU pod: as many as the CPU limit.
    cpu = container(rendered["cpu"])["resources"]
    assert int(pod_env(rendered["cpu"])["ISOQUANT_TORCH_THREADS"]) == int(cpu["limits"]["cpu"])


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_settings_come_from_the_configmap_and_load_in_the_service(name, rendered, monkeypatch):
    from service.settings import Settings

    c = container(rendered[name])
    (source,) = c["envFrom"]
    assert source["configMapRef"]["name"] == by_kind(rendered[name])["ConfigMap"]["metadata"]["name"]
    assert re.fullmatch(r"isoquant-settings-[a-z0-9]{10}", source["configMapRef"]["name"])
    (key,) = [e for e in c["env"] if e["name"] == "ISOQUANT_API_KEY"]
    assert key["valueFrom"] == {"secretKeyRef": {"name": "isoquant-api-key", "key": "api-key"}}
    for variable in [v for v in os.environ if v.startswith("ISOQUANT_")]:
        monkeypatch.delenv(variable)
    for variable, value in pod_env(rendered[name]).items():
        assert variable.startswith("ISOQUANT_"), variable
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("ISOQUANT_API_KEY", "from-the-secret")
    settings = Settings()
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert settings.api_key.get_secret_value() == "from-the-secret"
    assert settings.triton_cache_dir in {m["mountPath"] for m in c["volumeMounts"]}
    assert (settings.processes > 1) == (name == "gpu")
    # The container port is the one the service binds.
    (port,) = c["ports"]
    assert port["containerPort"] == settings.port and port["name"] == "http"


def test_service_links_are_off_because_they_would_break_the_settings(rendered, monkeypatch):
    """With service links, a Service named "isoquant" gives every pod of the namespace
    ISOQUANT_PORT=tcp://<cluster ip>:8000, which the service reads as its port."""
    from pydantic import ValidationError

    from service.settings import Settings

    assert by_kind(rendered["gpu"])["Service"]["metadata"]["name"] == "isoquant"
    for name in ("gpu", "cpu"):
        assert by_kind(rendered[name])["Deployment"]["spec"]["template"]["spec"]["enableServiceLinks"] is False
    monkeypatch.setenv("ISOQUANT_PORT", "tcp://10.96.0.12:8000")
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_probes_point_at_the_health_endpoints(name, rendered):
    c = container(rendered[name])
    assert c["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    # The compose files' start periods for the same warm-up: 600 s on a GPU (cold Triton cache), 300 s CPU.
    assert startup >= {"gpu": 600, "cpu": 300}[name]
    # Liveness never fails a busy pod for a slow answer: the health routes do not wait for the device.
    assert c["livenessProbe"]["timeoutSeconds"] >= 5 and c["livenessProbe"]["failureThreshold"] >= 3


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_selectors_ports_and_names_fit_together(name, rendered):
    kinds = by_kind(rendered[name])
    deployment, service = kinds["Deployment"], kinds["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert kinds["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert kinds["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == "http"
    (endpoint,) = kinds["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"] and endpoint["path"] == "/metrics"
    # The dashboard's process panels select job="isoquant": the operator names the job after the Service.
    assert service["metadata"]["name"] == "isoquant" and "jobLabel" not in kinds["ServiceMonitor"]["spec"]
    hpa = kinds["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "isoquant"}
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    assert hpa["spec"]["minReplicas"] >= 2 > kinds["PodDisruptionBudget"]["spec"]["maxUnavailable"]
    # The metric the autoscaler asks for is the one prometheus-adapter's rule serves.
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    (rule,) = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    # The target is the overlay's device workers times 3/4 (GPU), or its one worker (CPU).
    env = pod_env(rendered[name])
    workers = int(env.get("ISOQUANT_PROCESSES", 1)) * int(env.get("ISOQUANT_WORKERS", 1))
    assert float(metric["pods"]["target"]["averageValue"]) == {"gpu": 0.75 * workers, "cpu": workers}[name]


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_non_root_read_only_and_only_the_volumes_writable(name, rendered):
    spec = by_kind(rendered[name])["Deployment"]["spec"]["template"]["spec"]
    c = container(rendered[name])
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    assert spec["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert set(mounts) == {"/tmp", "/var/cache/isoquant/triton"} and set(mounts.values()) == set(volumes)
    cache = volumes[mounts["/var/cache/isoquant/triton"]]
    if name == "gpu":
        claim = cache["persistentVolumeClaim"]["claimName"]
        (pvc,) = [o for o in rendered[name] if o["kind"] == "PersistentVolumeClaim"]
        assert pvc["metadata"]["name"] == claim and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    else:
        assert "emptyDir" in cache


# ---- the service as the manifests run it ------------------------------------------------------------------

NEEDS_MOUNT_NAMESPACE = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("setpriv") is None,
    reason="needs root, unshare and setpriv (util-linux) for a private read-only mount namespace",
)
SMALL_WARM_SET = {
    "ISOQUANT_WARM_VARIANTS": "full",
    "ISOQUANT_WARM_DIMS": "64,128",
    "ISOQUANT_WARM_BITS": "3",
    "ISOQUANT_WARM_DTYPES": "float16,float32",
}
API_KEY = "k8s-test-key"


def _closed_folders(paths: list[Path]) -> dict[Path, set[Path]]:
    """Folders that other users cannot enter (mode without o+x, as /root on machines whose Python lives in
    /root/.pyenv) on the way to these paths -> their children the pod's user must reach there."""
    out: dict[Path, set[Path]] = {}
    for path in paths:
        real = Path(os.path.realpath(path))
        for parent in reversed(real.parents):
            if parent != Path("/") and not parent.stat().st_mode & 0o001:
                out.setdefault(parent, set()).add(parent / real.relative_to(parent).parts[0])
                break
    return out


def _outermost(paths: list[Path]) -> list[Path]:
    """The real paths among these that no other one contains (a tree bound once covers what is inside it)."""
    real = sorted({Path(os.path.realpath(p)) for p in paths}, key=lambda p: len(p.parts))
    out: list[Path] = []
    for path in real:
        if not any(path == o or o in path.parents for o in out):
            out.append(path)
    return out


def _container_script(mount_paths: list[str], uid: int, gid: int, port: int, staging: Path, reach: list[Path]) -> str:
    """Shell run by `unshare --mount`: the root filesystem read-only, a fresh writable tmpfs on each of the
    pod's volume mounts (an emptyDir is 0777), then the service as the pod's user. Mounts made here stay in
    the private namespace."""
    lines = ["set -e", "mount --make-rprivate /"]
    for n, (closed, children) in enumerate(sorted(_closed_folders(reach).items())):
        # The pod's user must reach the interpreter and the code: a read-only, enterable tmpfs over the closed
        # folder with only those trees in it (this machine's layout; nothing of it is the manifests').
        stages = [staging / f"{n}-{i}" for i in range(len(children))]
        lines += [f"mkdir -p {stage}" for stage in stages]
        lines += [f"mount --bind {child} {stage}" for child, stage in zip(sorted(children), stages, strict=True)]
        lines.append(f"mount -t tmpfs -o mode=0755,size=1m tmpfs {closed}")
        for child, stage in zip(sorted(children), stages, strict=True):
            lines += [f"mkdir -p {child}", f"mount --move {stage} {child}"]
        lines.append(f"mount -o remount,ro {closed}")
    for path in mount_paths:
        if not Path(path).exists():
            # Make the mount point under a throwaway tmpfs on its nearest existing parent, read-only again
            # afterwards (here, /var/cache: nothing the service reads lives there).
            parent = Path(path).parent
            while not parent.exists():
                parent = parent.parent
            lines += [f"mount -t tmpfs -o size=1m tmpfs {parent}", f"mkdir -p {path}", f"mount -o remount,ro {parent}"]
    # What the pod's user must reach and a volume would cover (a checkout under /tmp, as a CI clone may be):
    # bound aside before the volume's tmpfs covers it, moved back in after (/dev/shm: not a pod volume).
    covered = {path: [r for r in _outermost(reach) if Path(path) in Path(os.path.realpath(r)).parents]
               for path in mount_paths}
    aside = Path("/dev/shm") / f"isoquant-pod-{port}"
    for i, item in enumerate(item for items in covered.values() for item in items):
        lines += [f"mkdir -p {aside}/{i}", f"mount --bind {os.path.realpath(item)} {aside}/{i}"]
    lines.append("mount -o remount,bind,ro /")
    i = 0
    for path in mount_paths:
        lines.append(f"mount -t tmpfs -o mode=0777,size=2g tmpfs {path}")
        for item in covered[path]:
            real = os.path.realpath(item)
            # -n: mount(8) would record the move in /run/mount, on the now read-only root, and fail after it
            lines += [f"mkdir -p {real}", f"mount -n --move {aside}/{i} {real}", f"rmdir {aside}/{i}"]
            i += 1
    if i:
        lines.append(f"rmdir {aside}")  # /dev/shm is the host's: leave nothing there
    lines.append(
        f'exec setpriv --reuid={uid} --regid={gid} --clear-groups --no-new-privs "$@" '
        f"--host 127.0.0.1 --port {port}"
    )
    return "\n".join(lines)


def start_as_pod(objects: list[dict], overrides: dict[str, str], tmp: Path) -> tuple[subprocess.Popen, str, Path]:
    """``python -m service`` as the overlay's pod runs it: its ConfigMap's settings (with ``overrides``), its
    user, a read-only root filesystem with only its volumes writable, HOME not writable (the image's home;
    here it does not even exist). Returns (process, url, log); the caller stops it."""
    spec = by_kind(objects)["Deployment"]["spec"]["template"]["spec"]
    mounts = [m["mountPath"] for m in container(objects)["volumeMounts"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ISOQUANT_", "TRITON"))}
    env.update(pod_env(objects))
    env.update(overrides)
    env.update(HOME="/home/isoquant", PYTHONDONTWRITEBYTECODE="1")
    pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *pythonpath])
    port = free_port()
    staging = tmp / "staging"
    staging.mkdir()
    user = spec["securityContext"]
    reach = [Path(sys.executable), ROOT, *map(Path, pythonpath)]
    script = _container_script(mounts, user["runAsUser"], user["runAsGroup"], port, staging, reach)
    log = tmp / "service.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
             sys.executable, "-m", "service"],
            cwd="/", env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    return process, f"http://127.0.0.1:{port}", log


def _no_write_problems(process: subprocess.Popen, log: Path) -> None:
    # The root filesystem refuses writes in the pod's namespace ...
    probe = subprocess.run(["nsenter", "-t", str(process.pid), "-m", "touch", "/rofs-probe"],
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr, probe
    # ... and the service never met one.
    text = log.read_text(errors="replace")
    for problem in ("Read-only file system", "Permission denied", "Traceback"):
        assert problem not in text, text[-3000:]


def _terminate(process: subprocess.Popen, timeout: float = 60) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        raise


@NEEDS_MOUNT_NAMESPACE
def test_the_service_runs_on_a_read_only_root_filesystem(rendered):
    """As the GPU overlay runs it (its settings, several server processes, its user and volumes), on the
    CPU: every path but the pod's volumes read-only, HOME included. It warms up, serves, exposes the
    metrics of both processes (kept in a folder under /tmp) and shuts down cleanly."""
    # On this CPU machine: the CPU device, 2 processes rather than 8, a small warm set.
    overrides = {**SMALL_WARM_SET, "ISOQUANT_DEVICE": "cpu", "ISOQUANT_PROCESSES": "2", "ISOQUANT_API_KEY": API_KEY}
    with tempfile.TemporaryDirectory(prefix="isoquant-rofs-") as tmp:
        process, url, log = start_as_pod(rendered["gpu"], overrides, Path(tmp))
        try:
            wait_http(f"{url}/health/ready", 120, process, log)
            with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
                send_traffic(client, np.random.default_rng(3))
                metrics = client.get("/metrics").text
            # Both processes' samples, merged from the multiprocess folder under /tmp.
            assert re.search(r"^isoquant_ready(\{[^}]*\})? 1\.0$", metrics, re.M), metrics[-2000:]
            assert re.search(r'isoquant_vectors_total\{[^}]*op="quantize"[^}]*\} [1-9]', metrics)
            _no_write_problems(process, log)
        finally:
            code = _terminate(process)
        text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


# ---- the drain: measured ------------------------------------------------------------------------------------

def _bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (Ki, Mi, Gi or plain bytes)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


# A full queue of the largest request of dim 128: 65,536 float16 vectors (16 MiB), /quantize, full, 3 bits.
DRAIN_VECTORS = 65536


def _quantize_body(rng: np.random.Generator) -> bytes:
    vectors = rng.standard_normal((DRAIN_VECTORS, 128)).astype(np.float16)
    return save_safetensors({"vectors": vectors}, metadata={"variant": "full", "bits": "3"})


def test_shutdown_under_a_full_queue_fits_the_grace_period(rendered):
    """The CPU overlay's settings (ISOQUANT_MAX_QUEUE requests admitted, ISOQUANT_DRAIN_SECONDS, the job
    timeout), its 2 torch threads, on this 2-core machine (the pod's CPU limit): fill the queue with the
    largest dim-128 requests, SIGTERM, and time the exit. Every admitted request must be answered, and
    preStop + the exit must fit terminationGracePeriodSeconds with room to spare."""
    objects = rendered["cpu"]
    spec = by_kind(objects)["Deployment"]["spec"]["template"]["spec"]
    pre_stop = container(objects)["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = spec["terminationGracePeriodSeconds"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOQUANT_")}
    env.update(pod_env(objects))
    env.update(SMALL_WARM_SET, PYTHONPATH=str(ROOT))
    queue = int(env["ISOQUANT_MAX_QUEUE"])
    port = free_port()
    body = _quantize_body(np.random.default_rng(0))
    results: list[int | str] = []
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="isoquant-drain-") as tmp:
        log = Path(tmp) / "service.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/health/ready", 120, process, log)

            def one() -> None:
                try:
                    r = httpx.post(f"{url}/quantize", content=body, timeout=120,
                                   headers={"Content-Type": "application/x-safetensors"})
                    outcome: int | str = r.status_code
                except httpx.HTTPError as exc:
                    outcome = repr(exc)
                with lock:
                    results.append(outcome)

            threads = [threading.Thread(target=one) for _ in range(queue)]
            for t in threads:
                t.start()
            # Wait until every request is admitted (its body read: queued, running or already answered).
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                text = httpx.get(f"{url}/metrics", timeout=10).text
                admitted = sum(float(m) for m in re.findall(
                    r"^isoquant_(?:queue_depth|jobs_running) (\S+)$", text, re.M))
                answered = sum(float(m) for m in re.findall(
                    r'^isoquant_requests_total\{[^}]*route="/quantize"[^}]*\} (\S+)$', text, re.M))
                if admitted + answered >= queue:
                    break
                time.sleep(0.05)
            assert admitted + answered >= queue, f"{admitted} admitted, {answered} answered of {queue}"
            # Most of the queue is still ahead of the device (the first requests were answered meanwhile).
            assert admitted >= queue // 2, (admitted, answered)
            (resident,) = re.findall(r"^isoquant_process_resident_memory_bytes (\S+)$", text, re.M)
            start = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.wait(grace)
            exit_s = time.monotonic() - start
            for t in threads:
                t.join(60)
        finally:
            stop(process)
        text = log.read_text(errors="replace")
    # uvicorn re-raises the signal once it has shut down cleanly: killed by SIGTERM, as Kubernetes expects.
    assert process.returncode in (0, -signal.SIGTERM), text[-3000:]
    assert "Application shutdown complete" in text, text[-3000:]
    assert results == [200] * queue, results
    timeout = float(pod_env(objects)["ISOQUANT_JOB_TIMEOUT_S"])
    limit = _bytes(container(objects)["resources"]["limits"]["memory"])
    print(f"\nresident memory with the queue full: {float(resident) / 2**20:.0f} MiB (limit {limit / 2**20:.0f} MiB)")
    # The memory limit holds a full queue of these requests with room for larger bodies or other dims.
    assert float(resident) < 0.6 * limit, (resident, limit)
    print(f"shutdown with {admitted:.0f} of {queue} admitted requests ({DRAIN_VECTORS} float16 vectors of dim 128 "
          f"each) still to run: {exit_s:.1f} s; preStop {pre_stop} s, grace period {grace} s")
    # The service finished the queue well before uvicorn's own cap on the graceful shutdown (the job timeout
    # plus a margin of a few seconds), which bounds the exit whatever the queue holds (past it, open requests
    # are answered 503) ...
    assert exit_s < timeout, (exit_s, timeout)
    # ... and the grace period covers the preStop sleep plus that cap (with a margin of 5 s at most), with 10 s
    # to spare for the lifespan's wait for device work already started.
    assert grace >= pre_stop + timeout + 5 + 10, (grace, pre_stop, timeout)


@pytest.mark.gpu
@NEEDS_MOUNT_NAMESPACE
def test_the_gpu_overlay_on_a_gpu(rendered):
    """make test-gpu: the GPU overlay's pod as it runs (its settings, 8 server processes, its user, the root
    filesystem read-only, a cold Triton cache on the cache volume) compiles its kernels, serves, and under load
    from as many clients as it admits (ISOQUANT_PROCESSES x ISOQUANT_MAX_QUEUE, each sending the largest
    dim-128 request in a loop) stays within its memory limit and shuts down within the grace period without
    failing a request it had accepted. As in Kubernetes, where the preStop hook runs while the pod leaves the
    Service's endpoints, no new request is sent from SIGTERM on: the clients stop, the ones in flight are
    answered. ISOQUANT_TEST_WARM_SET=default warms the overlay's own warm set (minutes on a cold Triton
    cache, as a pod's first start) instead of a small one."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    objects = rendered["gpu"]
    env = pod_env(objects)
    spec = by_kind(objects)["Deployment"]["spec"]["template"]["spec"]
    c = container(objects)
    pre_stop, grace = c["lifecycle"]["preStop"]["sleep"]["seconds"], spec["terminationGracePeriodSeconds"]
    startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    limit = _bytes(c["resources"]["limits"]["memory"])
    clients = int(env["ISOQUANT_PROCESSES"]) * int(env["ISOQUANT_MAX_QUEUE"])
    overrides = {} if os.environ.get("ISOQUANT_TEST_WARM_SET") == "default" else dict(SMALL_WARM_SET)
    body = _quantize_body(np.random.default_rng(0))
    with tempfile.TemporaryDirectory(prefix="isoquant-gpu-pod-") as tmp:
        started = time.monotonic()
        process, url, log = start_as_pod(objects, overrides, Path(tmp))
        try:
            ready = wait_http(f"{url}/health/ready", startup, process, log).json()
            ready_s = time.monotonic() - started
            assert ready["backend"] == "triton" and ready["device"].startswith("cuda"), ready
            stop_load, lock = threading.Event(), threading.Lock()
            answered: list[float] = []
            refused: list[str] = []
            failures: list[str] = []
            peak = {"resident": 0.0, "admitted": 0.0, "gpu_reserved": 0.0}

            def client() -> None:
                with httpx.Client(base_url=url, timeout=120) as http:
                    while not stop_load.is_set():
                        try:
                            r = http.post("/quantize", content=body,
                                          headers={"Content-Type": "application/x-safetensors"})
                        except httpx.ConnectError as exc:  # the server stopped accepting: no request was sent
                            with lock:
                                refused.append(repr(exc))
                            return
                        except httpx.HTTPError as exc:
                            with lock:
                                failures.append(repr(exc))
                            return
                        with lock:
                            if r.status_code == 200:
                                answered.append(time.monotonic())
                            elif r.status_code == 503 and r.json()["error"]["type"] == "shutting_down":
                                # Its body was still arriving when the shutdown began: refused before any
                                # work, "retry on another instance" (the SDK retries 503s).
                                refused.append(r.text[:200])
                            else:
                                failures.append(f"{r.status_code} {r.text[:200]}")

            threads = [threading.Thread(target=client) for _ in range(clients)]
            load_start = time.monotonic()
            for t in threads:
                t.start()
            while time.monotonic() - load_start < 10:
                text = httpx.get(f"{url}/metrics", timeout=10).text
                values = {name: sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))
                          for name in ("isoquant_process_resident_memory_bytes", "isoquant_queue_depth",
                                       "isoquant_jobs_running")}
                reserved = re.findall(r'^isoquant_gpu_memory_bytes\{[^}]*kind="reserved"[^}]*\} (\S+)$', text, re.M)
                peak["resident"] = max(peak["resident"], values["isoquant_process_resident_memory_bytes"])
                peak["admitted"] = max(peak["admitted"],
                                       values["isoquant_queue_depth"] + values["isoquant_jobs_running"])
                peak["gpu_reserved"] = max(peak["gpu_reserved"], sum(map(float, reserved)))
                time.sleep(0.25)
            rate = sum(t >= load_start + 2 for t in answered) * DRAIN_VECTORS / (time.monotonic() - load_start - 2)
            _no_write_problems(process, log)
            stop_load.set()  # the clients send nothing new; each one's request in flight goes on
            sigterm = time.monotonic()
            code = _terminate(process, grace)
            exit_s = time.monotonic() - sigterm
            for t in threads:
                t.join(120)
            after = sum(t > sigterm for t in answered)
        finally:
            if process.poll() is None:
                process.kill()
        text = log.read_text(errors="replace")
    print(f"\nGPU pod: ready in {ready_s:.1f} s (warm-up {ready['warmup_seconds']:.1f} s, warm set "
          f"{'default' if not overrides else 'small'}); {clients} clients: {rate:,.0f} vectors/s, peak admitted "
          f"{peak['admitted']:.0f}, peak resident {peak['resident'] / 2**30:.2f} GiB (limit {limit / 2**30:.0f} GiB), "
          f"GPU reserved {peak['gpu_reserved'] / 2**30:.2f} GiB; SIGTERM under load: exit in {exit_s:.1f} s "
          f"(preStop {pre_stop} s, grace {grace} s); {len(answered)} answered ({after} of them in flight at SIGTERM), "
          f"{len(refused)} refused, {len(failures)} failed")
    assert code == 0, text[-3000:]
    # Every request the service had taken in whole was answered. One whose body was still arriving at SIGTERM
    # may be refused with 503 shutting_down (before any work; the SDK retries it elsewhere), never cut.
    assert not failures, failures[:5]
    assert len(refused) < clients // 4, refused[:5]
    assert len(answered) > clients and after > 0, (len(answered), after)
    assert peak["resident"] < limit, peak
    assert pre_stop + exit_s < grace, (exit_s, grace)
