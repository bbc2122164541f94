"""docker-compose.yml and the Dockerfile: valid against the Compose specification (the schema ships with
check-jsonschema), and what a deployment relies on: healthchecks and restart policies, images that compose can
build, the GPU workers' device settings, API keys, commands our CLI accepts, the image's helper scripts (the
worker healthcheck against a real worker, the entrypoint's model check). `docker compose config` runs too where
the docker CLI has the compose plugin."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV = {"INFERQ_API_KEYS": "key-one,key-two"}  # what a deployment sets (in .env)
GPU_WORKERS = ("worker-xpu", "worker-nvidia")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution for what this file uses: ${VAR}, ${VAR:-default}, ${VAR:?error}."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        current = env.get(name, "")
        if op == ":-":
            return current or arg
        if op == ":?" and not current:
            raise KeyError(f"{name}: {arg}")
        return current

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", substitute, value)


def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services(env: dict[str, str] | None = None) -> dict[str, dict]:
    return interpolate(raw(), ENV if env is None else env)["services"]


def inferq_services() -> dict[str, dict]:
    return {name: service for name, service in services().items() if service.get("image", "").startswith("inferq:")}


def test_compose_file_is_valid():
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(COMPOSE)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_the_whole_service():
    all_services = services()
    assert {"redis", "api", "webhook-worker", "worker-cpu", *GPU_WORKERS, "flower"} <= set(all_services)
    assert "--appendonly" in all_services["redis"]["command"]
    # A plain `up` serves the demo model on the CPU; the GPU workers and Flower are opt-in profiles.
    assert {name for name, service in all_services.items() if not service.get("profiles")} == {
        "redis", "api", "webhook-worker", "worker-cpu"}
    assert all_services["worker-xpu"]["profiles"] == ["xpu"]
    assert all_services["worker-nvidia"]["profiles"] == ["nvidia"]
    assert all_services["flower"]["profiles"] == ["flower"]
    assert all_services["worker-cpu"]["deploy"]["replicas"] == "1"
    assert services(ENV | {"CPU_WORKERS": "0"})["worker-cpu"]["deploy"]["replicas"] == "0"


def test_every_service_has_a_healthcheck_and_a_restart_policy():
    # Every service here runs for as long as the stack does (none is a one-shot job).
    for name, service in services().items():
        check = service.get("healthcheck")
        assert check and not check.get("disable") and check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert service.get("restart") in ("unless-stopped", "always") or \
            str(service.get("restart", "")).startswith("on-failure"), name


def test_worker_healthchecks_use_the_image_script():
    all_services = services()
    for name in ("worker-cpu", *GPU_WORKERS):
        assert all_services[name]["healthcheck"]["test"] == ["CMD", "inferq-healthcheck", "worker"], name
    assert all_services["webhook-worker"]["healthcheck"]["test"] == ["CMD", "inferq-healthcheck", "webhook-worker"]
    # The API's liveness, not /ready (503 while a model has no live worker).
    assert "/health'" in all_services["api"]["healthcheck"]["test"][-1]


def test_every_inferq_image_is_built_here():
    """No service pulls an inferq image (there is none to pull): each has the build that makes its tag, and
    services sharing a tag share one build."""
    builds: dict[str, dict] = {}
    for name, service in inferq_services().items():
        assert "build" in service, f"{name} uses {service['image']} without a build"
        build = service["build"] if isinstance(service["build"], dict) else {"context": service["build"]}
        assert builds.setdefault(service["image"], build) == build, f"{name} builds {service['image']} differently"
        context = ROOT / build.get("context", ".")
        assert (context / build.get("dockerfile", "Dockerfile")).is_file()
    assert set(builds) == {"inferq:cpu", "inferq:xpu", "inferq:cuda"}
    assert builds["inferq:xpu"]["args"] == {"TORCH_INDEX_URL": "https://download.pytorch.org/whl/xpu",
                                            "GPU_RUNTIME": "intel"}
    assert "/whl/cu" in builds["inferq:cuda"]["args"]["TORCH_INDEX_URL"]
    assert "args" not in builds["inferq:cpu"]  # the Dockerfile's defaults: the CPU build


def test_intel_worker_has_the_gpu():
    worker = services()["worker-xpu"]
    assert "/dev/dri:/dev/dri" in worker["devices"]
    assert {"render", "video"} <= set(worker["group_add"])
    assert services(ENV | {"RENDER_GID": "993"})["worker-xpu"]["group_add"][0] == "993"
    assert worker["environment"]["ZE_AFFINITY_MASK"] == "0"
    command = worker["command"]
    assert command[command.index("--device") + 1] == "xpu:0"
    moved = services(ENV | {"XPU_DEVICE": "2"})["worker-xpu"]
    assert moved["environment"]["ZE_AFFINITY_MASK"] == "2" and "xpu:2" in moved["command"]


def test_nvidia_worker_reserves_a_gpu():
    worker = services()["worker-nvidia"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["device_ids"] == ["0"]
    command = worker["command"]
    assert command[command.index("--device") + 1] == "cuda:0"  # the one GPU the container sees


def test_gpu_workers_refuse_a_missing_model_dir():
    """An unset MODEL_DIR must not become an empty directory docker creates: the bind's source is a path that does
    not exist, and docker refuses it (create_host_path: false)."""
    for env, source in ((ENV, "./MODEL_DIR-is-not-set"), (ENV | {"MODEL_DIR": "/srv/m"}, "/srv/m")):
        for name in GPU_WORKERS:
            (volume,) = services(env)[name]["volumes"]
            assert volume["source"] == source and volume["target"] == "/models/model"
            assert volume["read_only"] and volume["bind"]["create_host_path"] is False
    assert not (ROOT / "MODEL_DIR-is-not-set").exists()


def test_api_keys_are_required():
    """The API is published beyond loopback, so compose refuses to start it without keys (and does not switch
    `inferq api`'s own refusal off)."""
    with pytest.raises(KeyError, match="INFERQ_API_KEYS"):
        services({})
    api = services()["api"]
    assert api["environment"]["INFERQ_API_KEYS"] == ENV["INFERQ_API_KEYS"]
    assert "--allow-no-auth" not in api["command"] and "INFERQ_ALLOW_NO_AUTH" not in api["environment"]
    published = services(ENV | {"INFERQ_API_PUBLISH": "127.0.0.1:8000"})["api"]["ports"]
    assert published == ["127.0.0.1:8000:8000"]


def test_flower_is_loopback_only():
    flower = services()["flower"]
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
    assert flower["environment"]["FLOWER_UNAUTHENTICATED_API"] == "true"
    assert "--broker=redis://redis:6379/0" in flower["command"]


def test_commands_parse_with_our_cli():
    from worker.cli import build_parser

    for name, service in inferq_services().items():
        command = service["command"]
        assert command[0] == "inferq", name
        args = build_parser().parse_args(command[1:])
        assert args.command == command[1], name
        if args.command == "worker":
            assert args.served_model_name, name
    api = build_parser().parse_args(services()["api"]["command"][1:])
    assert (api.host, api.port) == ("0.0.0.0", 8000)


def test_cli_refuses_no_auth_beyond_loopback_unless_told():
    """The interface the compose decision leans on (worker/cli.py): `inferq api --allow-no-auth` exists."""
    from worker.cli import build_parser

    args = build_parser().parse_args(["api", "--host", "0.0.0.0", "--allow-no-auth"])
    assert args.allow_no_auth


def test_dockerfile_matches_the_repository():
    dockerfile = (ROOT / "Dockerfile").read_text()
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), line
                assert source.split("/")[0] not in ignored, f"{source} is excluded from the build context"
    for package in ("api", "worker", "engine"):
        assert f"COPY {package} {package}" in dockerfile
    # Dependencies before the source, the source installed without them.
    assert dockerfile.index("pip install -r /tmp/requirements.txt") < dockerfile.index("COPY api api")
    assert "pip install --no-deps ." in dockerfile
    assert "libze1 libze-intel-gpu1 intel-opencl-icd" in dockerfile


def test_dependency_layer_lists_pyproject():
    import tomllib

    result = subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"), str(ROOT / "pyproject.toml")],
                            capture_output=True, text=True, timeout=60, check=True)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert result.stdout.splitlines() == declared


def fake_inferq(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "inferq").write_text("#!/bin/sh\necho ran \"$@\"\n")
    (bin_dir / "inferq").chmod(0o755)
    return os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_entrypoint_stops_a_worker_without_a_model(tmp_path, demo_model_dir):
    env, entrypoint = fake_inferq(tmp_path), str(ROOT / "docker" / "entrypoint.sh")
    empty = tmp_path / "model"
    empty.mkdir()
    for model in (empty, tmp_path / "missing"):
        result = subprocess.run(["sh", entrypoint, "inferq", "worker", "--model", str(model), "--device", "cpu"],
                                capture_output=True, text=True, env=env, timeout=30, check=False)
        assert result.returncode == 64 and f"{model} is not a model: no config.json" in result.stderr
        assert "MODEL_DIR" in result.stderr and "ran" not in result.stdout
    for args in (["worker", "--model", str(demo_model_dir)], ["worker", f"--model={demo_model_dir}"],
                 ["worker", "--device", "cpu"], ["api", "--host", "0.0.0.0"]):
        result = subprocess.run(["sh", entrypoint, "inferq", *args], capture_output=True, text=True, env=env,
                                timeout=30, check=False)
        assert result.returncode == 0 and result.stdout.strip() == " ".join(["ran", *args]), result.stderr


def healthcheck(kind: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "docker" / "healthcheck.py"), kind], capture_output=True,
                          text=True, env=env, timeout=60, check=False)


@pytest.mark.slow
def test_worker_healthchecks_against_real_workers(redis_url, demo_model_dir, tmp_path):
    from tests.service import MODEL, Service

    service = Service(redis_url, demo_model_dir, tmp_path)
    env = service.env
    for kind in ("worker", "webhook-worker"):
        result = healthcheck(kind, env)
        assert result.returncode == 1 and "unhealthy" in result.stderr, result.stderr
    # A heartbeat of this host's worker whose Celery consumer does not answer: unhealthy.
    service.store.registry.announce(f"{socket.gethostname()}-deadbeef", {"model": "ghost"}, ttl_s=30)
    result = healthcheck("worker", env)
    assert result.returncode == 1 and "did not answer a ping" in result.stderr, result.stderr
    try:
        service.start_worker()
        service.start_webhook_worker()
        for kind in ("worker", "webhook-worker"):
            # The worker announces itself a moment before its Celery consumer is up: compose retries too.
            deadline = time.monotonic() + 60
            while True:
                started = time.monotonic()
                result = healthcheck(kind, env)
                assert time.monotonic() - started < 15  # within the compose healthcheck's timeout
                if result.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert result.returncode == 0, result.stderr
        assert service.store.registry.workers(MODEL)
    finally:
        service.stop()
    # Redis away: unhealthy, and says why.
    result = healthcheck("worker", env | {"INFERQ_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 1 and "ConnectionError" in result.stderr, result.stderr


def docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose", "-f", str(COMPOSE)]
    return None


@pytest.mark.skipif(docker_compose() is None, reason="no docker compose (the docker CLI's compose plugin)")
def test_docker_compose_accepts_the_file():
    compose = docker_compose()
    base = {key: value for key, value in os.environ.items()
            if not key.startswith(("INFERQ_", "MODEL_", "CPU_", "XPU_", "NVIDIA_", "RENDER_", "LOW_BIT",
                                   "COMPOSE_"))}
    profiles = ["--profile", "xpu", "--profile", "nvidia", "--profile", "flower"]
    result = subprocess.run([*compose, *profiles, "config", "--format", "json"], capture_output=True, text=True,
                            env=base | ENV, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)["services"]
    assert set(config) == set(services())
    for name, service in inferq_services().items():  # our substitution agrees with compose's
        assert config[name]["command"] == service["command"], name
    result = subprocess.run([*compose, "config", "-q"], capture_output=True, text=True, env=base, timeout=120,
                            check=False)
    assert result.returncode != 0 and "INFERQ_API_KEYS" in result.stderr
