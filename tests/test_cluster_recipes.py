"""cluster/ recipes: generated manifests match their configs, recipes keep private ports private."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import yaml

from serve_app.config import parse_app_config
from serve_app.kuberay import rayservice, render

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_committed_rayservice_is_exactly_what_the_generator_makes():
    cmd = [sys.executable, "-m", "serve_app", "kuberay", "cluster/gpu_serve_config.yaml"]
    generated = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    committed = (ROOT / "cluster" / "kuberay-rayservice.yaml").read_text()
    assert generated == committed, "regenerate: python -m serve_app kuberay cluster/gpu_serve_config.yaml > cluster/kuberay-rayservice.yaml"


def test_rayservice_embeds_a_valid_config_and_sizes_workers_for_tp():
    m = rayservice(str(ROOT / "cluster" / "gpu_serve_config.yaml"), name="x", image="img", gpus_per_worker=1, max_workers=2)
    serve_cfg = yaml.safe_load(m["spec"]["serveConfigV2"])
    app = parse_app_config(serve_cfg["applications"][0]["args"])
    assert {mm.name for mm in app.models} == {"llama-3.3-70b-instruct", "qwen3-reranker-8b", "bge-m3"}
    assert serve_cfg["http_options"]["host"] == "0.0.0.0"  # inside the pod; the Service decides exposure
    worker = m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "4"  # raised to fit one TP=4 replica
    head = m["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    assert head["num-cpus"] == "0"
    assert render(m, "cfg").startswith("# GENERATED")


def test_launcher_and_scripts_keep_dashboard_on_loopback():
    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster-aws.yaml").read_text())
    head_cmd = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmd
    assert launcher["available_node_types"]["head"]["resources"] == {"CPU": 0}
    for script in ("start-head.sh", "join-worker.sh"):
        path = ROOT / "cluster" / script
        subprocess.run(["bash", "-n", str(path)], check=True)
    assert "--dashboard-host=127.0.0.1" in (ROOT / "cluster" / "start-head.sh").read_text()


def test_every_recipe_starts_ray_with_the_serve_ingress_settings():
    """The HAProxy ingress and its replay policy are read where `ray start` runs, on every node."""
    from serve_app.ray_env import SERVE_ENV

    texts = {name: (ROOT / "cluster" / name).read_text() for name in ("start-head.sh", "join-worker.sh", "Dockerfile")}
    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster-aws.yaml").read_text())
    texts["launcher head"] = " ".join(launcher["head_start_ray_commands"])
    texts["launcher worker"] = " ".join(launcher["worker_start_ray_commands"])
    for name, text in texts.items():
        for key, value in SERVE_ENV.items():
            assert f'{key}={value}' in text or f'{key}="{value}"' in text, (name, key)
    m = rayservice(str(ROOT / "cluster" / "gpu_serve_config.yaml"), name="x", image="img", gpus_per_worker=1, max_workers=2)
    cluster = m["spec"]["rayClusterConfig"]
    for spec in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        env = {e["name"]: e["value"] for e in spec["template"]["spec"]["containers"][0]["env"]}
        assert SERVE_ENV.items() <= env.items()
