"""The alert rules and the dashboard under deploy/: promtool checks and unit-tests the rules, a real Prometheus scrapes
a live tools service and loads the rules, and every dashboard query names a metric the mesh exports."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import load_config
from services.tools import ToolsService
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "meshpilot.json"
needs_prometheus = pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("prometheus") is None,
    reason="no promtool/prometheus here: apt-get install prometheus (.ci/run does)",
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120)


@needs_prometheus
def test_the_rules_and_the_config_check_and_every_alert_fires_on_its_test_series() -> None:
    for args in (
        ("check", "rules", "rules.yml"),
        ("check", "config", "prometheus.yml"),
        ("test", "rules", "rules_test.yml"),
    ):
        done = promtool(*args)
        assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS_DIR / "rules_test.yml").read_text()))
    defined = set(re.findall(r"- alert: (\w+)", (PROMETHEUS_DIR / "rules.yml").read_text()))
    assert defined == tested, f"alerts without a unit test: {defined - tested}"


@needs_prometheus
def test_a_broken_rule_fails_the_check(tmp_path: Path) -> None:
    broken = tmp_path / "rules.yml"
    broken.write_text((PROMETHEUS_DIR / "rules.yml").read_text().replace("> 0.05", "> > 0.05", 1))
    done = subprocess.run(["promtool", "check", "rules", str(broken)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0


def _query(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["data"]


@pytest.mark.slow
@needs_prometheus
async def test_a_real_prometheus_scrapes_the_mesh_and_loads_the_rules(tmp_path: Path) -> None:
    metrics_port = free_port()
    config = load_config(
        data_dir=str(tmp_path / "mesh"),
        tools={"server": {"port": 0, "metrics_port": metrics_port}, "mcp_endpoint": {"enabled": False}},
    )
    service = ToolsService(config)
    await service.start()
    web = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{PROMETHEUS_DIR / 'rules.yml'}]\n"
        "scrape_configs:\n"
        f"  - job_name: meshpilot-tools\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{web}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{web}"
    try:
        async with grpc.aio.insecure_channel(service.server.address) as channel:
            await tools_pb2_grpc.ToolsServiceStub(channel).ListTools(tools_pb2.ListToolsRequest())
        deadline = time.monotonic() + 60
        series: list[Any] = []
        while not series:
            assert time.monotonic() < deadline, "Prometheus never scraped the tools service's ListTools calls"
            await asyncio.sleep(0.5)
            try:
                series = await asyncio.to_thread(
                    _query, base, "/api/v1/query", query='meshpilot_rpc_requests_total{method=~".*ListTools"}'
                )
                series = series["result"]
            except OSError:
                series = []  # not listening yet
        up = (await asyncio.to_thread(_query, base, "/api/v1/query", query='up{job="meshpilot-tools"}'))["result"]
        groups = (await asyncio.to_thread(_query, base, "/api/v1/rules"))["groups"]
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        await service.stop()
    assert series[0]["metric"]["code"] == "OK" and float(series[0]["value"][1]) >= 1
    assert up[0]["value"][1] == "1"
    assert {rule["name"] for group in groups for rule in group["rules"]} >= {
        "MeshPilotHighErrorRate",
        "MeshPilotReplicaDown",
        "MeshPilotJournalLag",
    }


def test_every_dashboard_query_names_metrics_the_mesh_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(dashboard["panels"]) >= 8 and all(exprs)
    source = "\n".join(path.read_text() for path in (ROOT / "services").rglob("*.py"))
    exported = set(re.findall(r'"(meshpilot_[a-z_]+)"', source))
    for expr in exprs:
        for name in re.findall(r"\b(meshpilot_[a-z_]+)", expr):
            base = re.sub(r"_(total|bucket|count|sum)$", "", name)
            assert base in exported, f"{name} in the dashboard is not a metric of the mesh"
