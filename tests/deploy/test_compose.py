"""docker-compose.yml and docker-compose.cpu.yml, read as Compose would (no Docker engine here): the three
services, the GPU reservation, healthchecks, volumes, configuration through ISOQUANT_* variables that
the service really reads, and the files mounted from the repository agreeing with each other."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from service.settings import Settings
from tests.deploy.conftest import (
    DASHBOARD,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    PROMETHEUS_CONFIG,
    ROOT,
    compose_merge,
    dashboard,
    dashboard_targets,
    load_yaml,
)

COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
_INTERPOLATION = re.compile(r"^\$\{([A-Z0-9_]+)(?::-(.*))?\}$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def compose_cpu(compose) -> dict:
    return compose_merge(compose, load_yaml(COMPOSE_CPU))


def seconds(value: str) -> float:
    """Compose durations: '90s', '10m', '1m30s'."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", str(value))
    assert parts and "".join(n + u for n, u in parts) == str(value), f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def env_value(value: object) -> tuple[str | None, object]:
    """(variable interpolated, value the service gets by default) of one environment entry."""
    if value is None:
        return None, None
    match = _INTERPOLATION.match(str(value))
    if match:
        return match.group(1), match.group(2)
    return None, value


def test_three_services_and_named_volumes(compose):
    assert set(compose["services"]) == {"isoquant", "prometheus", "grafana"}
    assert set(compose["volumes"]) == {"triton-cache", "prometheus-data", "grafana-data"}
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"
            else:
                assert source in compose["volumes"], f"{name} mounts undeclared volume {source}"
    # Third-party images are pinned to a release, never latest.
    for name in ("prometheus", "grafana"):
        image = compose["services"][name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name} image not pinned: {image}"


def test_service_reserves_a_gpu_and_builds_the_gpu_target(compose):
    service = compose["services"]["isoquant"]
    assert service["build"]["context"] == "."
    assert service["build"]["target"] == "gpu"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["capabilities"] == ["gpu"]
    assert devices[0]["driver"] == "nvidia"
    assert devices[0].get("count", "all") in (1, "all")
    assert env_value(service["environment"]["ISOQUANT_DEVICE"])[1] == "cuda"


def test_service_healthcheck_waits_for_warm_up(compose):
    check = compose["services"]["isoquant"]["healthcheck"]
    assert check["test"] == ["CMD", "python", "/opt/isoquant/healthcheck.py"]
    # Cold-cache warm-up compiles the warm set's Triton kernels: minutes.
    assert seconds(check["start_period"]) >= 300
    assert seconds(check["timeout"]) < seconds(check["interval"])
    assert check["retries"] >= 2
    # The script it runs ships in the image and probes the readiness route.
    assert "/health/ready" in (ROOT / "deploy" / "healthcheck.py").read_text()
    assert "COPY deploy/healthcheck.py /opt/isoquant/healthcheck.py" in (ROOT / "Dockerfile").read_text()


def test_triton_cache_is_a_named_volume_at_the_configured_path(compose):
    service = compose["services"]["isoquant"]
    cache = service["environment"]["ISOQUANT_TRITON_CACHE_DIR"]
    assert f"triton-cache:{cache}" in service["volumes"]


def test_environment_names_only_real_settings_with_valid_defaults(compose):
    """Every ISOQUANT_* variable the compose file sets is a Settings field (a typo would be silently
    ignored by the service), and the values it gets by default make a valid Settings."""
    env = compose["services"]["isoquant"]["environment"]
    fields = {f"ISOQUANT_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(set(env) - fields)
    assert not unknown, f"not settings of the service: {unknown}"
    defaults = {}
    for key, value in env.items():
        variable, default = env_value(value)
        if variable is not None:
            assert variable == key, f"{key} interpolates another variable, {variable}"
        if default is not None:
            defaults[key.removeprefix("ISOQUANT_").lower()] = default
    settings = Settings(**defaults)
    # The compose file says its ":-" defaults are the service's own: true except where it says otherwise.
    own = Settings()
    deliberate = {"device": "cuda", "drain_seconds": 5.0, "processes": 8}
    for name in defaults:
        expected = (
            deliberate.get(name, getattr(own, name)) if name not in ("host", "port", "triton_cache_dir") else None
        )
        if expected is not None:
            assert getattr(settings, name) == expected, f"ISOQUANT_{name.upper()}: {getattr(settings, name)!r}"
    assert settings.port == 8000 and settings.host == "0.0.0.0"
    # The API key is passed through only when set: an empty default would turn auth on with no key.
    assert "ISOQUANT_API_KEY" in env and env["ISOQUANT_API_KEY"] is None
    # Stopping waits for the drain and for queued device work.
    grace = seconds(compose["services"]["isoquant"]["stop_grace_period"])
    assert grace > settings.drain_seconds + settings.job_timeout_s


def test_ports_healthcheck_and_scrape_target_agree(compose):
    service = compose["services"]["isoquant"]
    port = int(env_value(service["environment"]["ISOQUANT_PORT"])[1])
    assert any(str(p).endswith(f":{port}") for p in service["ports"])
    prometheus = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "isoquant")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"isoquant:{port}"]
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose["services"]["prometheus"]["command"]


def test_grafana_provisioning_files_agree_with_the_mounts_and_the_dashboard(compose):
    grafana = compose["services"]["grafana"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in grafana["volumes"]}
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"  # Grafana's default path
    # Starts once the service is healthy.
    assert grafana["depends_on"]["isoquant"]["condition"] == "service_healthy"
    assert "prometheus" in grafana["depends_on"]

    (datasource_file,) = sorted(DATASOURCES.glob("*.yml"))
    datasources = yaml.safe_load(datasource_file.read_text())["datasources"]
    assert len(datasources) == 1
    source = datasources[0]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    prometheus_port = compose["services"]["prometheus"]["ports"][0].split(":")[-1]
    assert source["url"] == f"http://prometheus:{prometheus_port}"
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape

    (provider_file,) = sorted(DASHBOARD_PROVIDERS.glob("*.yml"))
    (provider,) = yaml.safe_load(provider_file.read_text())["providers"]
    assert provider["type"] == "file"
    dashboards_dir = provider["options"]["path"]
    assert mounts["./deploy/grafana/dashboards"] == dashboards_dir
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"

    # Every panel and query of the dashboard uses the provisioned datasource by its uid.
    board = dashboard()
    uids = {source["uid"]}
    for title, target in dashboard_targets(board):
        assert target["datasource"]["uid"] in uids, title
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] in uids, variable["name"]


def test_cpu_override_removes_the_gpu_and_keeps_the_rest(compose, compose_cpu):
    service = compose_cpu["services"]["isoquant"]
    assert "deploy" not in service, "the CPU stack must not reserve a GPU"
    assert service["build"] == {"context": ".", "target": "cpu"}
    assert service["environment"]["ISOQUANT_DEVICE"] == "cpu"
    assert service["environment"]["ISOQUANT_PROCESSES"] == "${ISOQUANT_PROCESSES:-1}"  # not the GPU stack's 8
    assert service["image"] != compose["services"]["isoquant"]["image"]
    # Healthcheck, volume and the other services are inherited unchanged.
    assert service["healthcheck"]["test"] == compose["services"]["isoquant"]["healthcheck"]["test"]
    assert service["volumes"] == compose["services"]["isoquant"]["volumes"]
    assert set(compose_cpu["services"]) == {"isoquant", "prometheus", "grafana"}
    assert compose_cpu["services"]["grafana"] == compose["services"]["grafana"]
    # And the override file says how it is used.
    assert "docker compose -f docker-compose.yml -f docker-compose.cpu.yml up" in COMPOSE_CPU.read_text()


def test_compose_merge_helper_applies_reset_and_appends():
    base = {"a": {"b": [1], "c": 1, "d": {"e": 1}}}
    override = load_yaml_text("a:\n  b: [2]\n  c: 2\n  d: !reset null\n")
    assert compose_merge(base, override) == {"a": {"b": [1, 2], "c": 2}}


def load_yaml_text(text: str) -> dict:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        f.write(text)
    try:
        return load_yaml(Path(f.name))
    finally:
        Path(f.name).unlink()
