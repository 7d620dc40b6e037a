"""The ops side against the real thing: Debian's ``prometheus`` server runs the repository's
``deploy/prometheus/prometheus.yml`` (only its targets moved to loopback ports) against a live service,
scrapes it, and answers over its HTTP API: the request counter, a latency quantile, and every query of the
Grafana dashboard (``deploy/grafana/dashboards/captioner.json``) parses and, where the traffic made here
produces the series, returns data. Every metric name the dashboard uses is declared by ``/metrics``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from service.app import create_app
from service.settings import Settings
from service.testing import LiveServer, free_port, image_bytes, random_store, wait_ready

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "captioner.json"
ADMIN_KEY = "prometheus-test-admin"


def binary(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    message = f"Debian's {name} is not installed (apt-get install prometheus); .ci/run installs it"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    out += [(f"variable {v['name']}", v["definition"]) for v in dashboard["templating"]["list"]]
    return out


def declared(metrics_text: str) -> set[str]:
    """Every sample name /metrics declares (from its TYPE lines), whether or not a sample exists yet."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "info": ("_info",), "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus-service")
    store = random_store(tmp / "store", lightcap=True)
    settings = Settings(_env_file=None, model_store=store.root, data_dir=tmp / "data", admin_key=ADMIN_KEY,
                        replicas=1, torch_threads=1, intake_threads=1, max_wait_ms=5)
    with LiveServer(create_app(settings)) as url:
        wait_ready(url)
        yield url


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory):
    exe = binary("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = yaml.safe_load(CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["captioner"]["static_configs"][0]["targets"] == ["api:8000"]  # compose's service name and port
    jobs["captioner"]["static_configs"][0]["targets"] = [service.removeprefix("http://")]
    jobs["prometheus"]["static_configs"][0]["targets"] = [f"127.0.0.1:{port}"]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    check = subprocess.run([binary("promtool"), "check", "config", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [exe, f"--config.file={path}", f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start: {(tmp / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def make_traffic(url: str) -> None:
    png = image_bytes(seed=3)
    for route, params in (("/v1/caption", {"model": "ucm"}), ("/v1/caption", {"model": "lightcap"}),
                          ("/v1/labels", {}), ("/v1/concepts", {})):
        for _ in range(2):
            r = httpx.post(f"{url}{route}", params=params, files={"file": ("a.png", png, "image/png")}, timeout=60)
            assert r.status_code == 200, r.text
    assert httpx.post(f"{url}/v1/caption", files={"file": ("a.png", b"text", "image/png")}).status_code == 415
    job = httpx.post(f"{url}/v1/jobs", files={"files": ("a.png", png, "image/png")}, data={"model": "ucm"}).json()
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/v1/jobs/{job['id']}").json()["state"] != "succeeded":
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.1)
    r = httpx.post(f"{url}/v1/models/ucm-captioner/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text


def query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def wait_for(prom: str, expr: str, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while not (result := query(prom, expr)):
        assert time.monotonic() < deadline, f"no data for {expr} after {timeout} s"
        time.sleep(0.5)
    return result


def test_dashboard_metric_names_are_all_declared_by_metrics(service):
    names = declared(httpx.get(f"{service}/metrics").text)
    for title, expr in dashboard_queries():
        used = set(re.findall(r"\bcaptioner_[a-z0-9_]+", expr))
        assert used, f"{title}: no captioner metric in {expr}"
        assert used <= names, f"{title}: {sorted(used - names)} are not in /metrics"


def test_prometheus_scrapes_the_service_and_answers_the_dashboards_queries(service, prometheus):
    make_traffic(service)
    deadline = time.monotonic() + 60  # service discovery hands the static targets over shortly after start
    while {t["labels"]["job"] for t in httpx.get(f"{prometheus}/api/v1/targets").json()["data"]["activeTargets"]
           } != {"captioner", "prometheus"}:
        assert time.monotonic() < deadline, httpx.get(f"{prometheus}/api/v1/targets").text
        time.sleep(0.2)
    # The counter after a scrape that saw all the traffic (8 image requests answered 200, one 415).
    wait_for(prometheus, 'sum(captioner_http_requests_total{route=~"/v1/(caption|labels|concepts)",status="200"}) >= 8')
    up = query(prometheus, 'up{job="captioner"}')
    assert up[0]["value"][1] == "1" and up[0]["metric"]["service"] == "captioner"
    # rate() needs two scrapes that both saw the requests: make more, wait for the next scrape.
    make_traffic(service)
    p95 = wait_for(prometheus, 'histogram_quantile(0.95, sum by (le) (rate(captioner_http_request_duration_seconds_bucket'
                               '{route="/v1/caption"}[1m]))) > 0')
    assert math.isfinite(float(p95[0]["value"][1]))
    # Every dashboard query, as Grafana sends it, is valid PromQL here; the ones this traffic feeds have data.
    empty = []
    for title, expr in dashboard_queries():
        if expr.startswith("label_values("):
            metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", expr).groups()
            r = httpx.get(f"{prometheus}/api/v1/label/{label}/values", params={"match[]": metric}).json()
            assert "ucm-captioner" in r["data"], f"{title}: {r}"
            continue
        result = query(prometheus, expr.replace("$__rate_interval", "1m").replace("$model", ".*"))
        if not result:
            empty.append(title)
    # Only drops (deadline/cancel) never happen in this traffic; everything else is on the dashboard with data.
    assert set(empty) <= {"Rejected and failed requests"}, empty
    dropped = query(prometheus, "captioner_dropped_items_total")
    assert dropped == []  # ...and that panel's other query (4xx/5xx) is not empty: checked next
    assert query(prometheus, 'sum by (route, status) (rate(captioner_http_requests_total{status=~"4..|5.."}[1m]))')
