"""The benchmark harness measures what it claims: the load generator against a local server (status
codes, streamed first tokens and usage, Retry-After), CPU time per room from /proc, steps run from
the checkout they name, and the table's ratios."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from bench.load import run
from bench.rooms import Meter, descendants, per_unit
from bench.run import compare_rows, foreign_code, merge_runs, run_steps, table, with_revision, worktree


def _app() -> Starlette:
    async def ok(request):
        return JSONResponse({"ok": True})

    async def busy(request):
        return JSONResponse({"error": {"message": "full"}}, status_code=503, headers={"retry-after": "1"})

    async def stream(request):
        async def events():
            yield 'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n'
            await asyncio.sleep(0.02)  # the first token comes later than the first chunk
            for word in ("a", "b", "c"):
                yield "data: " + json.dumps({"choices": [{"delta": {"content": word}}]}) + "\n\n"
            yield 'data: {"choices": [], "usage": {"completion_tokens": 3}}\n\n'
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/ok", ok, methods=["POST"]), Route("/busy", busy, methods=["POST"]),
                             Route("/stream", stream, methods=["POST"])])


@pytest.fixture(scope="module")
def base():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_app(), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True


def test_closed_loop_counts_every_request_by_status(base):
    r = asyncio.run(run(f"{base}/ok", {}, 2, 0.5, warmup_s=0.1))
    assert r.codes == {200: len(r.latencies_ms)} and len(r.latencies_ms) > 10
    assert r.rps == pytest.approx(len(r.latencies_ms) / r.seconds)
    assert 0 < r.pct(0.5) <= r.pct(0.99)


def test_stream_records_first_content_token_and_usage(base):
    r = asyncio.run(run(f"{base}/stream", {}, 1, 0.3, warmup_s=0, stream=True))
    n = len(r.latencies_ms)
    assert n >= 2 and r.tokens == 3 * n
    # not the role chunk that came first (at ~0 ms); the server sleeps 20 ms, and asyncio may wake it a little early
    assert len(r.ttft_ms) == n and min(r.ttft_ms) >= 15
    assert r.summary()["tokens_per_s"] == pytest.approx(3 * n / r.seconds)


def test_rejected_clients_wait_retry_after_only_when_asked(base):
    storm = asyncio.run(run(f"{base}/busy", {}, 2, 0.5, warmup_s=0))
    polite = asyncio.run(run(f"{base}/busy", {}, 2, 0.5, warmup_s=0, honour_retry_after=True))
    assert polite.codes == {503: 2}  # one each, then a 1 s wait that outlasts the run
    assert storm.codes[503] > 20


def test_table_prints_ratios_against_the_same_runs_baselines():
    lat = {"rps": 100.0, "p50": 2.0, "p99": 4.0}
    results = {
        "uvicorn": {"c1": {"rps": 1000.0, "p50": 0.5, "p99": 1.0}, "c32": {"rps": 2000.0, "p50": 1.0, "p99": 2.0}},
        "serve-ours": {"c1": lat, "c32": {**lat, "rps": 500.0}},
        "raw-rerank": {"pairs_per_s": 400.0, "best_batch": 64},
        "http-rerank": {"pairs_per_s": 300.0},
        "infinity": {"pairs_per_s": 200.0},
    }
    out = table(results)
    assert "| serve-ours: req/s at c1 | 100 | 1,000 (uvicorn) | 0.10x |" in out
    assert "| serve-ours: req/s at c32 | 500 | 2,000 (uvicorn) | 0.25x |" in out
    assert "| serve-ours: p50 at c1 | 2.00 ms | 0.50 ms | +1.50 ms |" in out
    assert "0.75x" in out and "1.50x" in out  # vs raw, and vs Infinity


def test_table_prints_the_cost_of_request_stories_against_stories_off():
    on, off = {"rps": 970.0, "p50": 1.1, "p99": 3.0}, {"rps": 1000.0, "p50": 1.0, "p99": 3.0}
    mem = {shape: {"bytes_per_10k": 20 * 2**20, "bytes_per_story": 2097} for shape in ("rerank", "llm", "retried")}
    out = table({"serve-ours": {"c1": on, "c32": on}, "serve-ours-nostories": {"c1": off, "c32": off}, "stories-memory": mem})
    assert "| request stories kept: req/s at c32 | 970 | 1,000 (stories off) | 0.97x |" in out
    assert "| request stories kept: p50 at c1 | 1.10 ms | 1.00 ms | +0.10 ms |" in out
    assert "| request stories: memory per 10,000 kept, a retried LLM stream | 20.0 MiB | | |" in out


def test_table_prints_the_token_policy_against_serves_default_from_the_same_run():
    ours = {"ttft_p99_ms": 700.0, "ttft_p50_ms": 90.0, "long_ttft_p99_ms": 700.0, "chat_ttft_p99_ms": 120.0, "replica_seconds": 210.0}
    base = {"ttft_p99_ms": 1400.0, "ttft_p50_ms": 100.0, "long_ttft_p99_ms": 1400.0, "chat_ttft_p99_ms": 100.0, "replica_seconds": 200.0}
    out = table({"autoscale-tokens": ours, "autoscale-requests": base})
    assert ("| autoscaling, bursts of chats and long prompts: TTFT p99, every request | 700 ms (token policy) | "
            "1400 ms (Serve's default) | 0.50x |") in out
    assert "| autoscaling, the same run: replica-seconds held | 210 | 200 | 1.05x |" in out
    assert "autoscaling" not in table({"autoscale-tokens": ours})  # no baseline from the same run: no row


def test_stories_memory_step_measures_the_book_the_router_keeps():
    from bench.stories import measure

    small = measure("rerank")
    assert 200 < small["bytes_per_story"] < 20_000 and measure("retried")["bytes_per_story"] > small["bytes_per_story"]


def _burn(cpu_s: float) -> None:
    """Spends `cpu_s` of this thread's own CPU time, however busy the machine is."""
    t0 = time.thread_time()
    while time.thread_time() - t0 < cpu_s:
        pass


def test_meter_counts_each_rooms_cpu_over_the_window_only():
    before = threading.Thread(target=_burn, args=(0.3,))
    before.start()
    before.join()  # spent before the window: not counted
    go, burned, done = threading.Event(), threading.Event(), threading.Event()
    burner = threading.Thread(target=lambda: (go.wait(), _burn(0.3), burned.set(), done.wait()))
    idle = threading.Thread(target=done.wait)
    burner.start(), idle.start()
    pid = os.getpid()
    meter = Meter(lambda: {"process": [pid], "burner": [(pid, burner.native_id)], "idle": [(pid, idle.native_id)]},
                  background=("process",))
    meter.start()
    go.set()
    burned.wait()
    out = meter.stop()
    done.set()
    # /proc counts in clock ticks (10 ms): a tick either way
    assert 0.28 <= out["cpu_s"]["burner"] < 0.45 and out["cpu_s"]["idle"] < 0.05
    assert out["cpu_s"]["burner"] - 0.02 <= out["cpu_s"]["process"] < 0.6 and out["exited"] == []


CHILD = """import sys, time
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
print("spent", flush=True)
sys.stdin.read()
"""


def test_meter_counts_a_process_born_in_the_window_from_zero_and_names_one_that_ended():
    gone = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    rooms = {"children": [gone.pid]}
    meter = Meter(lambda: rooms)
    meter.start()
    gone.communicate(b"")  # ended and reaped inside the window
    born = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    rooms["children"] = [gone.pid, born.pid]
    assert born.stdout.readline() == b"spent\n"
    out = meter.stop()
    born.communicate(b"")
    assert out["cpu_s"]["children"] >= 0.28 and out["processes"] == {"children": 1}
    assert out["exited"] == [f"children:{gone.pid}"]


def test_descendants_walks_the_whole_tree_and_nothing_else():
    table_ = {10: (1, "driver"), 11: (10, "raylet"), 12: (11, "ray::router"), 13: (12, "haproxy"), 20: (1, "other"), 21: (20, "x")}
    assert descendants(10, table_) == [11, 12, 13]
    assert descendants(13, table_) == []


def test_per_unit_sums_the_path_and_leaves_the_background_out():
    measured = {"cpu_s": {"router": 0.2, "engine": 0.6, "ray": 1.0}, "window_s": 4.0, "background": ["ray"]}
    out = per_unit(measured, requests=10, tokens=640)
    assert out["ms_per_request"] == pytest.approx({"router": 20.0, "engine": 60.0, "ray": 100.0, "sum": 80.0})
    assert out["us_per_token"]["sum"] == pytest.approx(1250.0)
    assert "us_per_token" not in per_unit(measured, requests=10, tokens=0)


def _llm(tps: float, ttft: float, cpu: dict[str, float], tokens_per_request: int = 64, idle: dict[str, float] | None = None) -> dict:
    level = {"rps": 1.0, "p50": 1.0, "p99": 1.0, "tokens_per_s": tps, "ttft_p50": ttft,
             "cpu": {"ms_per_request": cpu, "us_per_token": {k: 1000 * v / tokens_per_request for k, v in cpu.items()}}}
    return {"ready_s": 30.0, "c1": level, "c8": level, **({"idle_cpu": {"ms_per_s": idle}} if idle else {})}


def test_table_pairs_each_llm_room_with_bare_vllms_and_compares_revisions():
    results = {
        "vllm-serve": _llm(200.0, 100.0, {"api server": 10.0, "engine": 40.0, "sum": 50.0}, idle={"api server": 0.0, "engine": 20.0}),
        "llm-stack@abc1234": _llm(150.0, 180.0, {"haproxy": 1.0, "router": 8.0, "replica": 16.0, "engine": 40.0, "sum": 65.0}),
        "llm-stack": _llm(180.0, 130.0, {"haproxy": 1.0, "router": 4.0, "replica": 12.0, "engine": 40.0, "sum": 57.0},
                          idle={"router": 15.0, "engine": 20.0}),
    }
    out = table(results)
    assert "| LLM tokens/s at c8 | 180.0 | 200.0 (vllm serve) | 0.90x |" in out
    assert "| LLM@abc1234 tokens/s at c8 | 150.0 | 200.0 (vllm serve) | 0.75x |" in out
    assert "| LLM TTFT p50 at c1 | 130 ms | 100 ms | +30 ms |" in out
    assert ("| LLM CPU at c8, serving layer (LLM replica vs vllm serve's API server) | 12.00 ms/req, 188 µs/token "
            "| 10.00 ms/req, 156 µs/token | 1.20x |") in out
    assert "| LLM CPU at c8, router replica | 4.00 ms/req, 62 µs/token |  |  |" in out
    assert "| LLM CPU at c8, all rooms on the path | 57.00 ms/req, 891 µs/token | 50.00 ms/req, 781 µs/token | 1.14x |" in out
    assert "| LLM CPU with no traffic, router replica | 15.0 ms/s |  | |" in out
    assert "| LLM CPU with no traffic, engine core | 20.0 ms/s | 20.0 ms/s | |" in out
    assert "| llm-stack now vs @abc1234: tokens/s at c8 | 180.0 | 150.0 | 1.20x |" in out
    assert "| llm-stack now vs @abc1234: TTFT p50 at c1 | 130 ms | 180 ms | -50 ms |" in out
    assert "| llm-stack now vs @abc1234: CPU at c1, router replica | 4.00 ms/req, 62 µs/token | 8.00 ms/req, 125 µs/token | 0.50x |" in out


def test_cpu_net_of_idle_subtracts_what_each_room_spends_with_no_traffic():
    measured, idle = {"cpu_s": {"router": 0.9, "engine": 2.0}, "window_s": 10.0}, {"router": 50.0, "engine": 0.0}
    out = per_unit(measured, requests=4, tokens=400, idle_ms_per_s=idle)
    assert "net" not in per_unit(measured, requests=4, tokens=400)
    assert out["ms_per_request"]["router"] == pytest.approx(225.0)
    assert out["net"]["ms_per_request"] == pytest.approx({"router": 100.0, "engine": 500.0, "sum": 600.0})
    assert out["net"]["us_per_token"]["router"] == pytest.approx(1000.0)
    ours = {"rps": 1.0, "p50": 1.0, "p99": 1.0, "cpu": out}
    bare = {"rps": 1.0, "p50": 1.0, "p99": 1.0, "cpu": per_unit({**measured, "cpu_s": {"engine": 1.0}}, requests=4, tokens=400,
                                                                 idle_ms_per_s=idle)}
    from bench.run import cpu_cell, cpu_ratio

    assert cpu_cell(ours, "router") == "100.00 ms/req, 1,000 µs/token net of idle (raw 225.00)"
    assert cpu_ratio(ours, bare, "engine", "engine") == "2.00x"  # net vs net
    assert cpu_ratio(ours, {"cpu": {"us_per_token": {"engine": 2000.0}}}, "engine", "engine") == "2.50x"  # raw vs raw (5000 / 2000)


def test_revision_rows_need_both_runs_and_skip_rooms_the_old_bench_did_not_measure():
    now = {"c1": {"rps": 300.0, "p50": 3.0, "p99": 9.0, "cpu": {"ms_per_request": {"router": 2.0, "sum": 3.0}}}}
    old = {"c1": {"rps": 200.0, "p50": 4.0, "p99": 9.0}}
    rows = compare_rows("serve-ours", "abc", now, old)
    assert rows == ["| serve-ours now vs @abc: req/s at c1 | 300 | 200 | 1.50x |",
                    "| serve-ours now vs @abc: p50 at c1 | 3.00 ms | 4.00 ms | -1.00 ms |"]
    assert "now vs" not in table({"serve-ours@abc": old})


def test_gateway_cpu_rows_against_the_uvicorn_server_thread():
    lat = {"rps": 100.0, "p50": 2.0, "p99": 4.0}
    cpu = {"ms_per_request": {"haproxy": 0.2, "router": 1.5, "replica": 0.8, "sum": 2.5, "ray": 3.0}}
    results = {"uvicorn": {c: {**lat, "cpu": {"ms_per_request": {"uvicorn": 0.25}}} for c in ("c1", "c32")},
               "serve-ours": {c: {**lat, "cpu": dict(cpu)} for c in ("c1", "c32")}}
    out = table(results)
    assert "| serve-ours: CPU at c32, all rooms on the path | 2.50 ms/req | 0.25 ms/req (uvicorn server thread) | 10.00x |" in out
    assert "| serve-ours: CPU at c1, null backend replica | 0.80 ms/req |  |  |" in out
    results["serve-ours"]["c1"]["cpu"] |= {"meter_ms": 12.0, "window_s": 6.0}
    results["serve-ours"]["c32"]["cpu"] |= {"meter_ms": 8.0, "window_s": 4.0}
    assert "| serve-ours: the CPU split's own work (outside the measured latencies) | 10.0 ms per load level (0.20% of the measured time) | | |" in table(results)


def test_stack_steps_also_run_on_the_revision_just_before_and_baselines_once():
    here, there = pathlib.Path("/a"), pathlib.Path("/b")
    plan = [("vllm-serve", "bare", ["bench.baselines", "vllm-serve"], {}, here),
            ("llm-stack", "ours", ["bench.stack", "--scenario", "llm"], {"K": "1"}, here)]
    out = with_revision(plan, "abc", there)
    assert [(name, root) for name, _, _, _, root in out] == [("vllm-serve", here), ("llm-stack@abc", there), ("llm-stack", here)]
    assert out[1][2:4] == (["bench.stack", "--scenario", "llm"], {"K": "1"})


def test_repeated_runs_table_the_median_of_each_figure():
    runs = [{"c1": {"rps": 100.0, "codes": {"200": 10}, "cpu": {"ms_per_request": {"router": 2.0}}}, "note": "a"},
            {"c1": {"rps": 300.0, "codes": {"200": 30}, "cpu": {"ms_per_request": {"router": 9.0}}}, "note": "b"},
            {"c1": {"rps": 200.0, "codes": {"200": 20, "503": 1}, "cpu": {"ms_per_request": {}}}, "note": "c"}]
    assert merge_runs(runs) == {"c1": {"rps": 200.0, "codes": {"200": 20}, "cpu": {"ms_per_request": {"router": 5.5}}}, "note": "a"}


def test_repeats_alternate_which_revision_goes_first():
    plan = [("llm-stack", "ours", ["bench.stack"], {}, pathlib.Path("/a"))]
    assert [s[0] for s in with_revision(plan, "abc", pathlib.Path("/b"), rev_first=False)] == ["llm-stack", "llm-stack@abc"]


def test_summarize_gives_cpu_net_of_the_idle_use_measured_after_the_load(monkeypatch):
    from bench.load import Result, summarize

    class Idle:
        def idle(self, seconds):
            return {"ms_per_s": {"router": 100.0}}

    monkeypatch.setattr("bench.load.IDLE_SETTLE_S", 0)
    r = Result(latencies_ms=[1.0, 1.0], seconds=1.0, cpu={"cpu_s": {"router": 0.5}, "window_s": 2.0})
    out = summarize({"c1": r}, Idle())
    assert out["idle_cpu"] == {"ms_per_s": {"router": 100.0}}
    assert out["c1"]["cpu"]["net"]["ms_per_request"]["router"] == pytest.approx(150.0)  # (0.5 - 0.1 * 2) / 2 requests
    assert "net" not in summarize({"c1": r}, None)["c1"]["cpu"]


def _checkout(root: pathlib.Path, reported: str | None = None) -> pathlib.Path:
    """A checkout with a step module that reports where it was imported from (as bench/stack.py's
    replicas do), or a path of our choosing."""
    (root / "probe").mkdir(parents=True)
    (root / "probe" / "__init__.py").write_text("")
    where = repr(reported) if reported else "__file__"
    (root / "probe" / "step.py").write_text(f'import json\nprint("RESULT " + json.dumps({{"code": {{"r": {{"serve_app": {where}}}}}}}))\n')
    return root


def test_steps_run_the_code_of_the_checkout_they_name(tmp_path, monkeypatch):
    a, b = _checkout(tmp_path / "a"), _checkout(tmp_path / "b")
    stray = _checkout(tmp_path / "c", reported=str(tmp_path / "a" / "probe" / "step.py"))
    monkeypatch.setenv("PYTHONPATH", str(a))  # as in a run from a stable copy: the step's own checkout must still win
    monkeypatch.chdir(a)
    results = run_steps([("a", "", ["probe.step"], {}, a), ("b", "", ["probe.step"], {}, b), ("c", "", ["probe.step"], {}, stray)], 1)
    assert results["a"]["code"]["r"]["serve_app"] == str(a / "probe" / "step.py")
    assert results["b"]["code"]["r"]["serve_app"] == str(b / "probe" / "step.py")
    assert "c" not in results  # it reported another checkout's code: dropped, not tabled


def test_foreign_code_names_what_came_from_elsewhere(tmp_path):
    code = {"router": {"pid": 1, "serve_app": str(tmp_path / "serve_app/__init__.py"), "deployments": "/work/main/deployments/__init__.py"}}
    assert foreign_code(code, tmp_path) == ["router: deployments from /work/main/deployments/__init__.py"]


def test_worktree_checks_out_the_revision_and_is_removed_after(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for text in ("old", "new"):
        (repo / "f.txt").write_text(text)
        subprocess.run([*git, "add", "f.txt"], check=True)
        subprocess.run([*git, "commit", "-qm", text], check=True)
    (repo / "models").mkdir()
    monkeypatch.chdir(repo)
    with worktree("HEAD~1") as (rev, tree):
        assert (tree / "f.txt").read_text() == "old" and (tree / "models").resolve() == (repo / "models").resolve()
        assert len(rev) >= 7
    assert not tree.exists()
    assert str(tree) not in subprocess.run([*git, "worktree", "list"], capture_output=True, text=True).stdout


def test_a_step_that_hangs_is_ended_with_what_it_started(tmp_path, monkeypatch):
    root = tmp_path / "hang"
    (root / "probe").mkdir(parents=True)
    (root / "probe" / "__init__.py").write_text("")
    pidfile = tmp_path / "child.pid"
    (root / "probe" / "step.py").write_text(
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n")
    monkeypatch.chdir(tmp_path)
    t0 = time.time()
    # 15 s, not 3: beside the e2e suite two Python starts (the step, its child) once took longer than
    # 3 s on the 2-core machine, and the step was ended before it had started anything to end.
    assert run_steps([("hang", "", ["probe.step"], {}, root)], 1, timeout_s=15) == {}
    assert time.time() - t0 < 60
    assert not _alive(int(pidfile.read_text()))


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie its new parent has not reaped yet."""
    for _ in range(50):
        try:
            state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state == "Z":
            return False
        time.sleep(0.1)
    return True


def test_the_routing_workload_is_the_same_for_every_policy_and_its_turns_extend_each_other():
    from bench.routing import ENGINE, conversations, routing_model, shared_system

    a, b = conversations(), conversations()
    assert a == b and len(a) == 12 * 2 + 12  # seeded: every policy gets the same requests
    multi = [c for c in a if len(c) == 3]
    assert len(multi) == 24
    for turns in multi:  # each turn's messages start with the previous turn's
        for earlier, later in zip(turns, turns[1:]):
            assert later["messages"][: len(earlier["messages"])] == earlier["messages"]
    assert len({c[0]["messages"][0]["content"] for c in shared_system()}) == 1
    assert routing_model("power_of_two")["deployment"]["num_replicas"] == 2
    # Ray's router takes the request-router slot of cache_aware; every policy's engines evict alike.
    assert routing_model("ray_prefix")["routing"]["policy"] == "cache_aware"
    assert all(routing_model(p)["engine_kwargs"].items() >= ENGINE.items() for p in ("power_of_two", "cache_aware", "ray_prefix"))


def test_the_bare_engines_behind_vllm_router_get_the_routing_steps_engine_settings():
    from bench.baselines import vllm_command
    from bench.routing import ENGINE, routing_entry
    from serve_app.config import ModelConfig
    from serve_app.presets import apply_preset

    model = apply_preset(ModelConfig.model_validate(routing_entry()))
    cmd = vllm_command(model, pathlib.Path("/m"), 8100)
    for key, value in ENGINE.items():
        flag = "--" + key.replace("_", "-")
        assert cmd[cmd.index(flag) + 1] == str(value), cmd
    assert cmd[cmd.index("--max-model-len") + 1] == str(model.max_input_tokens)


def test_ray_prefix_routers_text_is_the_bodys_messages_and_none_for_other_calls():
    from types import SimpleNamespace

    from bench.peers import RayPrefixCacheAffinity

    router = RayPrefixCacheAffinity.__new__(RayPrefixCacheAffinity)  # no Serve: only the text extraction
    body = {"model": "m", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]}
    pending = lambda method, args: SimpleNamespace(args=args, metadata=SimpleNamespace(call_method=method))  # noqa: E731
    assert router._extract_text_from_request(pending("create_stream", ("chat", body, "rid"))) == "SQ"
    assert router._extract_text_from_request(pending("create", ("completion", {"prompt": "P"}, "rid"))) == "P"
    assert router._extract_text_from_request(pending("card", ())) is None


def test_the_routing_rows_compare_ours_and_the_peers_with_serves_default():
    phase = {"requests": 66, "failed": 0, "vllm_hit_rate": 0.6, "ttft_p50_s": 0.5, "ttft_p99_s": 2.0,
             "output_tokens_per_s": 20.0, "max_replica_share": 0.55, "wall_s": 60}
    base = {**phase, "vllm_hit_rate": 0.3, "ttft_p50_s": 1.0}
    ray_peer, vllm_peer = {**phase, "vllm_hit_rate": 0.45}, {**phase, "vllm_hit_rate": 0.5}
    both = lambda p: {"conversations": p, "shared_system_prompt": p}  # noqa: E731
    out = table({"routing-ours": both(phase), "routing-default": both(base), "routing-ray-prefix": both(ray_peer),
                 "routing-vllm-router": both(vllm_peer)})
    assert "| routing, shared-prefix conversations: vLLM prefix hit rate | 0.600 | 0.300 (Serve's default) | 2.00x |" in out
    assert "| routing, shared-prefix conversations: TTFT p50 | 500 ms | 1000 ms | 0.50x |" in out
    assert ("| routing, shared-prefix conversations (Ray's PrefixCacheAffinityRouter): vLLM prefix hit rate | 0.450 | "
            "0.300 (Serve's default) | 1.50x |") in out
    assert ("| routing, one system prompt for all: our hit rate vs the best peer's | 0.600 | 0.500 "
            "(vllm-router cache_aware) | 1.20x |") in out


def test_suite_cpu_passes_on_the_commands_status_and_counts_its_cpu_time():
    """bench/suite_cpu.py: the README's suite-time numbers come from it."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5:\n    pass\nraise SystemExit(3)"
    r = subprocess.run([sys.executable, "-m", "bench.suite_cpu", "--", sys.executable, "-c", burn],
                       capture_output=True, text=True, timeout=60, cwd=pathlib.Path(__file__).resolve().parents[1])
    assert r.returncode == 3, r.stderr
    rows = dict(line.split()[1:3] for line in r.stderr.splitlines() if line.startswith("[suite_cpu]   "))
    assert float(rows["python"]) >= 1.0, r.stderr  # the child's 1.5 s of CPU (its name: the interpreter's)
    assert "cores" in r.stderr and "even if packed perfectly" in r.stderr
