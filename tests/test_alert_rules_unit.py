"""The Prometheus alert rules: valid for promtool, firing on the conditions they name (promtool's
own rule unit tests over synthetic series), over metrics that really exist, and the KubeRay
PrometheusRule generated from them unchanged."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import yaml

from tests.local_servers import needs, require

ROOT = pathlib.Path(__file__).resolve().parents[1]
RULES = ROOT / "docs" / "grafana" / "serve_app_alerts.yaml"
PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "promtool not installed (apt-get install -y prometheus; scripts/install.sh does it as root)"
needs_promtool = needs(PROMTOOL is not None, NO_PROMTOOL)


def _exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_committed_prometheus_rule_is_exactly_what_the_generator_makes():
    cmd = [sys.executable, "-m", "serve_app", "alert-rules"]
    generated = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    committed = (ROOT / "cluster" / "prometheus-rule.yaml").read_text()
    assert generated == committed, "regenerate: python -m serve_app alert-rules > cluster/prometheus-rule.yaml"
    assert yaml.safe_load(committed)["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_rules_use_only_metrics_that_are_exported():
    from serve_app.metrics import RouterMetrics

    ours: list[str] = []
    RouterMetrics(factory=lambda kind, name, desc, tags: ours.append(name) or type("M", (), {})())
    ray_dir = pathlib.Path(__import__("ray").__file__).parent
    ray_sources = "".join(p.read_text(errors="ignore") for d in ("serve/_private", "dashboard/modules/reporter")
                          for p in (ray_dir / d).glob("*.py"))
    used = {m for e in _exprs() for m in re.findall(r"\bray_(\w+)", e)}
    assert used
    for metric in used:
        base = re.sub(r"_(total|bucket)$", "", metric)
        if metric.startswith("serve_app_"):
            assert base in ours, metric
        else:  # Ray's own: the name as Ray registers it (counters may carry _total in the name itself)
            assert f'"{base}"' in ray_sources or f'"{metric}"' in ray_sources, metric


@needs_promtool
def test_promtool_accepts_the_rules_and_the_generated_manifest_groups(tmp_path):
    require(PROMTOOL is not None, NO_PROMTOOL)
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    spec = tmp_path / "from-manifest.yaml"
    spec.write_text(yaml.safe_dump({"groups": yaml.safe_load((ROOT / "cluster" / "prometheus-rule.yaml").read_text())["spec"]["groups"]}))
    out = subprocess.run([PROMTOOL, "check", "rules", str(spec)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


PROMTOOL_TESTS = {
    "rule_files": ["rules.yaml"],  # RULES without annotations: promtool compares them whole
    "evaluation_interval": "15s",
    "tests": [
        {   # model `ce` lost every healthy replica while Serve wants 2; model `ok` is fine
            "interval": "15s",
            "input_series": [
                {"series": 'ray_serve_deployment_replica_healthy{application="a",deployment="rerank-ce"}', "values": "2 2 0x12"},
                {"series": 'ray_serve_autoscaling_target_replicas{application="a",deployment="rerank-ce"}', "values": "2x14"},
                {"series": 'ray_serve_deployment_replica_healthy{application="a",deployment="ok"}', "values": "1x14"},
                {"series": 'ray_serve_autoscaling_target_replicas{application="a",deployment="ok"}', "values": "1x14"},
            ],
            "alert_rule_test": [
                {"eval_time": "2m", "alertname": "ServeModelNoReadyReplica",
                 "exp_alerts": [{"exp_labels": {"severity": "critical", "application": "a", "deployment": "rerank-ce"}}]},
                {"eval_time": "20s", "alertname": "ServeModelNoReadyReplica", "exp_alerts": []},
            ],
        },
        {   # node 10.0.0.12 stops reporting at 1m; 10.0.0.11 keeps reporting
            "interval": "15s",
            "input_series": [
                {"series": 'ray_node_cpu_count{ip="10.0.0.11"}', "values": "8x20"},
                {"series": 'ray_node_cpu_count{ip="10.0.0.12"}', "values": "8x4 stale"},  # scrape gone: staleness marker
            ],
            "alert_rule_test": [
                {"eval_time": "30s", "alertname": "RayNodeLeft", "exp_alerts": []},
                {"eval_time": "5m", "alertname": "RayNodeLeft",
                 "exp_alerts": [{"exp_labels": {"severity": "critical", "ip": "10.0.0.12"}}]},
            ],
        },
        {   # `capped` wants 5 replicas, max_replicas holds it at 4, requests queue from 30 s on: it fires after 30 s
            # more; `burst` queues for one scrape; `fits` queues at its max while the policy wants no more
            "interval": "15s",
            "input_series": [
                {"series": 'ray_serve_autoscaling_desired_replicas{application="a",deployment="capped"}', "values": "5x12"},
                {"series": 'ray_serve_autoscaling_target_replicas{application="a",deployment="capped"}', "values": "4x12"},
                {"series": 'ray_serve_deployment_queued_queries{application="a",deployment="capped",handle="h1"}',
                 "values": "0 0 3x10"},
                {"series": 'ray_serve_autoscaling_desired_replicas{application="a",deployment="burst"}', "values": "5x12"},
                {"series": 'ray_serve_autoscaling_target_replicas{application="a",deployment="burst"}', "values": "4x12"},
                {"series": 'ray_serve_deployment_queued_queries{application="a",deployment="burst",handle="h1"}',
                 "values": "0 0 3 0x9"},
                {"series": 'ray_serve_autoscaling_desired_replicas{application="a",deployment="fits"}', "values": "4x12"},
                {"series": 'ray_serve_autoscaling_target_replicas{application="a",deployment="fits"}', "values": "4x12"},
                {"series": 'ray_serve_deployment_queued_queries{application="a",deployment="fits",handle="h1"}', "values": "3x12"},
            ],
            "alert_rule_test": [
                {"eval_time": "45s", "alertname": "ServeAutoscalerAtMaxWithQueue", "exp_alerts": []},
                {"eval_time": "2m", "alertname": "ServeAutoscalerAtMaxWithQueue",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "application": "a", "deployment": "capped"}}]},
            ],
        },
        {   # an open circuit refuses requests
            "interval": "15s",
            "input_series": [{"series": 'ray_serve_app_circuit_rejections_total{model="chat"}', "values": "0+5x10"}],
            "alert_rule_test": [{"eval_time": "2m", "alertname": "ServeModelCircuitOpen",
                                 "exp_alerts": [{"exp_labels": {"severity": "critical", "model": "chat"}}]}],
        },
    ],
}


@needs_promtool
def test_rules_fire_on_the_conditions_they_name(tmp_path):
    require(PROMTOOL is not None, NO_PROMTOOL)
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for rule in (r for g in groups for r in g["rules"]):
        rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    spec = tmp_path / "tests.yaml"
    spec.write_text(yaml.safe_dump(PROMTOOL_TESTS))
    out = subprocess.run([PROMTOOL, "test", "rules", str(spec)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
