"""Prometheus config and alert rules pass promtool; every dashboard panel has a datasource and PromQL that
promtool accepts and that names only metrics the exporter really exports; compose and Helm use these files."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import pytest
import yaml

from fedtune.federation import free_port
from fedtune.metrics.service import Exporter
from fedtune.metrics.state import Traffic
from tests.observability.helpers import (
    ALERTS,
    DASHBOARD,
    PROM_CONFIG,
    REPO,
    base_name,
    concrete,
    dashboard_panels,
    exported_names,
    metric_names,
    need_tool,
)
from tests.observability.test_exporter import round_record, write_results


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """Every metric name the exporter serves once it knows a run (synthetic results + SuperLink traffic)."""
    root = tmp_path_factory.mktemp("outputs")
    write_results(root, 1, [round_record(1, {"11": 10}, failed=["22"], rejected={"11": "oversize"})])
    exporter = Exporter([root], host="127.0.0.1", port=free_port()).start()
    try:
        exporter.state.set_traffic({"1": Traffic("running", 1, 1)})
        text = urllib.request.urlopen(f"http://127.0.0.1:{exporter.port}/metrics", timeout=5).read().decode()
    finally:
        exporter.stop()
    return exported_names(text) | {"up"}


def test_promtool_check_config():
    promtool = need_tool("promtool")
    done = subprocess.run([promtool, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_check_rules():
    promtool = need_tool("promtool")
    done = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_use_exported_metrics(exported):
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {
        "FedtuneBudgetAboveLimit", "FedtuneNoRoundProgress", "FedtuneNodeFailures", "FedtuneExporterDown",
    }
    for rule in rules:
        names = {base_name(n) if n not in exported else n for n in metric_names(rule["expr"])}
        assert names, rule
        assert names <= exported, (rule["alert"], names - exported)


def test_every_panel_has_a_datasource_and_exported_promql(exported, tmp_path):
    panels = dashboard_panels()
    assert len(panels) >= 10
    exprs = []
    for panel in panels:
        assert panel.get("datasource", {}).get("type") == "prometheus", panel["title"]
        assert panel.get("targets"), panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["type"] == "prometheus", panel["title"]
            expr = target.get("expr", "")
            assert expr.strip(), panel["title"]
            names = metric_names(expr)
            assert names, (panel["title"], expr)
            missing = {n for n in names if n not in exported and base_name(n) not in exported}
            assert not missing, (panel["title"], missing)
            exprs.append(concrete(expr))
    # promtool parses PromQL offline in rule files: one recording rule per panel expression.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"fedtune:dashboard_expr_{i}", "expr": e} for i, e in enumerate(exprs)
    ]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([need_tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_covers_the_issue():
    dash = json.loads(DASHBOARD.read_text())
    text = json.dumps(dash)
    assert dash["uid"] == "fedtune"
    assert "fedtune_communication_budget_reference_mb" in text  # budget vs the reference 2942.79 MB
    assert 'kind, direction' in text  # leaderboard vs on-wire
    for name in ("fedtune_round_duration_seconds", "fedtune_node_train_loss", "fedtune_node_failures_total",
                 "fedtune_rejected_updates_total", "fedtune_round_communication_bytes"):
        assert name in text, name


def test_compose_and_helm_mount_these_files():
    helm_dashboard = REPO / "helm" / "fedtune" / "dashboards" / "fedtune.json"
    assert helm_dashboard.resolve() == DASHBOARD.resolve()
    compose = yaml.safe_load((REPO / "docker/compose.superlink.yaml").read_text())["services"]
    assert "../monitoring/prometheus:/etc/prometheus:ro" in compose["prometheus"]["volumes"]  # from docker/
    assert compose["superlink"]["environment"]["FEDTUNE_METRICS_PORT"] == "9400"
    targets = yaml.safe_load(PROM_CONFIG.read_text())["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["superlink:9400"]
    grafana = compose["grafana"]["volumes"]
    assert "../monitoring/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana
    provider = yaml.safe_load((REPO / "monitoring/grafana/provisioning/dashboards/fedtune.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
