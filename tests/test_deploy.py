"""The files under deploy/, checked offline: Kubernetes manifests, docker compose, monitoring.

Schemas: Kubernetes' own (kubernetes-validate, strict), the Compose Specification (the copy
check-jsonschema ships) and KEDA's ScaledObject CRD (cloudcoil-models-keda's models).
deploy/kubernetes is rendered with `kubectl kustomize`. The metric names in the dashboard
and the autoscalers are looked up in a running server's /metrics.
"""

import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import requests
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from helpers import MODEL, ROOT, SERVER_VENV, metrics, wait_for

import prepare_qwen_pt
from serving.openai_api.__main__ import parse_args as openai_args
from serving.tritonserver import UNUSED_GPU_FEATURES_OFF, LocalServer

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose"
K8S_VERSIONS = ["1.30", "1.37"]  # the oldest and newest Kubernetes the manifests are checked against
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:26.08-vllm-python-py3"
METRIC_NAME = re.compile(r"vllm:[a-zA-Z0-9_:]+|nv_[a-zA-Z0-9_]+")


def load_all(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(tmp_path, components=()) -> list[dict]:
    """What `kubectl apply -k deploy/kubernetes` would apply, with these components enabled."""
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent))  # requirements/test.txt installs it
    assert kubectl, "kubectl is missing from the environment: run scripts/setup.sh"
    tree = tmp_path / "kubernetes"
    shutil.copytree(K8S, tree)
    kustomization = yaml.safe_load((tree / "kustomization.yaml").read_text())
    kustomization["components"] = list(components)
    (tree / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    done = subprocess.run([kubectl, "kustomize", str(tree)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def find(docs, kind, name):
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def values() -> dict[str, str]:
    """The literals of kustomization.yaml's ConfigMaps: the settings users change."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return dict(literal.split("=", 1) for generator in kustomization["configMapGenerator"] for literal in generator["literals"])


def container(deployment, name, init=False):
    spec = deployment["spec"]["template"]["spec"]
    (found,) = [c for c in spec["initContainers" if init else "containers"] if c["name"] == name]
    return found


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    return render(tmp_path_factory.mktemp("default"))


@pytest.fixture(scope="module")
def rendered_keda(tmp_path_factory):
    return render(tmp_path_factory.mktemp("keda"), ["keda"])


def compose() -> dict:
    return yaml.safe_load((COMPOSE / "compose.yaml").read_text())


def dashboard() -> dict:
    return json.loads((COMPOSE / "grafana" / "dashboards" / "triton-vllm.json").read_text())


def compose_validator():
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def scaled_object_ok(doc) -> bool:
    """Valid against KEDA's CRD, with no field the CRD lacks (the model drops unknown ones)."""
    return ScaledObject.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json") == doc


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_kubernetes_schemas(version, rendered, rendered_keda):
    resources = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    files = [doc for name in resources for doc in load_all(K8S / name)]
    checked = set()
    for doc in files + rendered + rendered_keda:
        if doc["kind"] == "ScaledObject":
            continue  # a KEDA CRD: test_keda_scaled_object_matches_its_crd
        kubernetes_validate.validate(doc, version, strict=True)
        checked.add(doc["kind"])
    kinds = {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    assert checked == kinds


def test_keda_scaled_object_matches_its_crd(rendered_keda):
    assert scaled_object_ok(load_all(K8S / "keda" / "scaledobject.yaml")[0])
    assert scaled_object_ok(find(rendered_keda, "ScaledObject", "triton"))


def test_validators_reject_a_misspelt_field():
    deployment = load_all(K8S / "openai.yaml")[0]
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    scaled = load_all(K8S / "keda" / "scaledobject.yaml")[0]
    scaled["spec"]["maxReplicas"] = 8
    assert not scaled_object_ok(scaled)
    assert list(compose_validator().iter_errors({"services": {"x": {"imag": "y"}}}))


def test_values_come_from_the_kustomization(rendered, rendered_keda):
    v = values()
    triton = find(rendered, "Deployment", "triton")
    assert triton["spec"]["replicas"] == int(v["TRITON_REPLICAS"])
    assert find(rendered, "Deployment", "openai")["spec"]["replicas"] == int(v["OPENAI_REPLICAS"])
    hpa = find(rendered, "HorizontalPodAutoscaler", "triton")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (int(v["TRITON_REPLICAS"]), int(v["TRITON_MAX_REPLICAS"]))
    assert hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == v["WAITING_PER_POD"]
    (model,) = [d for d in rendered if d["kind"] == "ConfigMap"]  # the scaling values stay local
    assert model["data"] == {
        k: v[k] for k in ("MODEL_SOURCE", "MODEL_ID", "MODEL_NAME", "GPU_MEMORY_UTILIZATION", "MAX_MODEL_LEN")
    }
    refs = {e["valueFrom"]["configMapKeyRef"]["name"] for e in container(triton, "prepare-model", init=True)["env"]}
    assert refs == {model["metadata"]["name"]}
    assert container(triton, "triton")["image"] == TRITON_IMAGE
    namespace = find(rendered, "Namespace", model["metadata"]["namespace"])
    assert all(d["metadata"].get("namespace") == namespace["metadata"]["name"] for d in rendered if d is not namespace)

    assert not [d for d in rendered_keda if d["kind"] == "HorizontalPodAutoscaler"]
    spec = find(rendered_keda, "ScaledObject", "triton")["spec"]
    trigger = spec["triggers"][0]["metadata"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (int(v["TRITON_REPLICAS"]), int(v["TRITON_MAX_REPLICAS"]))
    assert (trigger["threshold"], trigger["serverAddress"]) == (v["WAITING_PER_POD"], v["PROMETHEUS_URL"])
    assert f'namespace="{namespace["metadata"]["name"]}"' in trigger["query"]


def test_triton_pods(rendered):
    triton = find(rendered, "Deployment", "triton")
    pod = triton["spec"]["template"]
    server = container(triton, "triton")
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert mounts["/models"] in {m["name"] for m in container(triton, "prepare-model", init=True)["volumeMounts"]}
    startup = server["startupProbe"]
    assert startup["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    service = find(rendered, "Service", "triton")
    assert {p["port"] for p in service["spec"]["ports"]} == {8000, 8001, 8002}
    for selecting in (
        service["spec"]["selector"],
        find(rendered, "PodDisruptionBudget", "triton")["spec"]["selector"]["matchLabels"],
    ):
        assert selecting.items() <= pod["metadata"]["labels"].items()


def test_openai_service_talks_to_triton_grpc(rendered):
    openai = find(rendered, "Deployment", "openai")
    server = container(openai, "openai")
    args = openai_args(server["command"][3:])
    host, port = args.triton_url.split(":")
    triton_ports = {p["name"]: p["port"] for p in find(rendered, "Service", host)["spec"]["ports"]}
    assert int(port) == triton_ports["grpc"] and args.port == 9000
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    assert find(rendered, "Service", "openai")["spec"]["ports"][0]["port"] == 9000


def test_commands_take_these_flags(rendered):
    """prepare_qwen_pt.py and tritonserver accept every flag the manifests and compose pass."""
    triton = find(rendered, "Deployment", "triton")
    data = next(d for d in rendered if d["kind"] == "ConfigMap")["data"]
    prepare = [re.sub(r"\$\((\w+)\)", lambda m: data[m.group(1)], a) for a in container(triton, "prepare-model", True)["command"]]
    assert prepare[:2] == ["python", "prepare_qwen_pt.py"]
    args = prepare_qwen_pt.parse_args(prepare[2:])
    assert (args.name, args.gpu_memory_utilization, args.device) == (
        data["MODEL_NAME"],
        float(data["GPU_MEMORY_UTILIZATION"]),
        "gpu",
    )
    prepare_qwen_pt.parse_args(compose()["services"]["prepare"]["command"][2:])

    tritonserver = SERVER_VENV / "tritonserver" / "bin" / "tritonserver"
    usage = subprocess.run([tritonserver, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
    known = set(re.findall(r"^\s+(--[\w-]+)", usage, re.MULTILINE))
    for command in (container(triton, "triton")["command"], compose()["services"]["triton"]["command"]):
        assert command[0] == "tritonserver" and "--model-repository=/models" in command
        assert {a.split("=")[0] for a in command[1:]} <= known


def test_every_way_of_starting_triton_turns_off_the_gpu_features_the_model_does_not_use(rendered, tmp_path):
    env = {**os.environ, "MODEL_REPOSITORY": str(tmp_path), "LOG_DIR": str(tmp_path)}
    dry = subprocess.run(
        ["./start_triton.sh", "--mode", "docker", "--dry-run", "--no-openai"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert dry.returncode == 0, dry.stderr
    (docker_run,) = [line for line in dry.stdout.splitlines() if line.startswith("+ docker run")]
    commands = {
        "local": LocalServer(model_repository=tmp_path).command(),
        "docker": shlex.split(docker_run),
        "kubernetes": container(find(rendered, "Deployment", "triton"), "triton")["command"],
        "compose": compose()["services"]["triton"]["command"],
    }
    for where, command in commands.items():
        assert set(UNUSED_GPU_FEATURES_OFF) <= set(command), where


def test_prometheus_adapter_feeds_the_hpa(rendered):
    rule = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"][0]
    hpa = find(rendered, "HorizontalPodAutoscaler", "triton")
    assert rule["name"]["as"] == hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert METRIC_NAME.findall(rule["seriesQuery"]) == ["vllm:num_requests_waiting"]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}


def test_compose_matches_the_compose_spec():
    spec = compose()
    errors = [e.message for e in compose_validator().iter_errors(spec)]
    assert not errors
    triton = spec["services"]["triton"]
    assert triton["image"] == TRITON_IMAGE
    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1
    assert {p.rsplit(":", 1)[1] for p in triton["ports"]} == {"8000", "8001", "8002"}
    assert triton["shm_size"] and "../../model_repository:/models" in triton["volumes"]
    openai = openai_args(spec["services"]["openai"]["command"][3:])
    assert (openai.triton_url, openai.workers) == ("triton:8001", 4)
    for service in spec["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), volume


def test_images_are_pinned(rendered):
    images = [
        c["image"]
        for d in rendered
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"].get("initContainers", []) + d["spec"]["template"]["spec"]["containers"]
    ]
    images += [s["image"] for s in compose()["services"].values()]
    images += re.findall(r"^FROM (\S+)", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    for image in images:
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", image


def test_dockerfile_copies_what_the_containers_run():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    copied = {p.rstrip("/") for line in re.findall(r"^COPY (.+)$", dockerfile, re.MULTILINE) for p in shlex.split(line)[:-1]}
    assert {"requirements.txt", "prepare_qwen_pt.py", "model_template.py", "serving", "triton_vllm_model"} <= copied
    allowed = {
        line[1:].rstrip("/") for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if line.startswith("!")
    }
    assert copied <= allowed
    assert all((ROOT / path).exists() for path in copied)


def test_prometheus_scrapes_triton_and_grafana_reads_it():
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]]
    assert "triton:8002" in targets
    (source,) = yaml.safe_load((COMPOSE / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose()["services"]
    uids = {t["datasource"]["uid"] for p in dashboard()["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}


def test_dashboard_has_the_panels():
    panels = {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard()["panels"]}
    assert "vllm:generation_tokens_total" in " ".join(panels["Output tokens/s"])
    for title, histogram in [("Time to first token", "time_to_first_token"), ("Time per output token", "time_per_output_token")]:
        quantiles = {re.match(r"histogram_quantile\(([\d.]+),", e).group(1) for e in panels[title] if histogram in e}
        assert quantiles == {"0.5", "0.95", "0.99"}, title
    running = " ".join(panels["Requests running and waiting"])
    assert "vllm:num_requests_running" in running and "vllm:num_requests_waiting" in running
    assert any("nv_inference_request_failure" in e for exprs in panels.values() for e in exprs)


def test_queries_name_only_metrics_the_server_exports(server, generate_url):
    for prompt in ("Hi", "Hello there"):
        answer = requests.post(generate_url, json={"text_input": prompt, "parameters": {"max_tokens": 2}}, timeout=120)
        assert answer.status_code == 200, answer.text
    assert wait_for(lambda: metrics(server).get("vllm:e2e_request_latency_seconds_count", 0) >= 2, 10)
    text = requests.get(f"http://{server.host}:{server.metrics_port}/metrics", timeout=10).text
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}

    board = dashboard()
    queries = [t["expr"] for p in board["panels"] for t in p["targets"]]
    queries += [v["definition"] for v in board["templating"]["list"]]
    rule = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"][0]
    queries += [rule["seriesQuery"], rule["name"]["matches"]]
    queries += [load_all(K8S / "keda" / "scaledobject.yaml")[0]["spec"]["triggers"][0]["metadata"]["query"]]
    named = {name for query in queries for name in METRIC_NAME.findall(query)}
    assert {"vllm:num_requests_waiting", "vllm:time_to_first_token_seconds_bucket", "nv_inference_request_failure"} <= named
    assert named - exported == set()
    assert f'model="{MODEL}"' in text
