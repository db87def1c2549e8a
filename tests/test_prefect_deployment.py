"""flows/prefect.yaml for real: a Prefect server on loopback, a process work pool, the deployment
created by `prefect deploy`, a run of it picked up and executed by a worker."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, make_project, project_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"prefect server not healthy at {url} after {timeout}s")


@pytest.fixture
def prefect_server(tmp_path):
    """(project dir, environment pointing at a fresh Prefect server on 127.0.0.1)."""
    project = make_project(tmp_path / "proj")
    shutil.copy(REPO / "params-gpu.yaml", project)           # the deployment's profile, over the tiny params
    port = free_port()
    env = project_env(project)
    home = tmp_path / "prefect-home"
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PREFECT_LOCAL_STORAGE_PATH=str(tmp_path / "results"),
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5")
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(env["PREFECT_API_URL"], server)
        yield project, env
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def prefect(args: list[str], project: Path, env: dict, timeout: float = 180) -> str:
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_deployment_runs_on_a_process_worker_of_the_work_pool(prefect_server):
    project, env = prefect_server
    prefect(["work-pool", "create", "gpu-pool", "--type", "process"], project, env)
    prefect(["--no-prompt", "deploy", "--prefect-file", "flows/prefect.yaml", "--all"], project, env)

    # schedule a run the way the UI's "Quick run" with custom parameters does (no GPU here)
    trigger = ("from prefect.deployments import run_deployment\n"
               "run = run_deployment('hatchling-pipeline/gpu', timeout=0, parameters="
               "{'stages': ['crawl'], 'overrides': []})\n"
               "print(run.id)\n")
    run_id = subprocess.run([sys.executable, "-c", trigger], cwd=project, env=env, capture_output=True, text=True,
                            check=True, timeout=120).stdout.split()[-1]
    assert not (project / "data/crawl").exists()

    # the worker: started elsewhere (here: another directory), it pulls into $HATCHLING_HOME
    worker_env = {**env, "HATCHLING_HOME": str(project)}
    worker = subprocess.run([sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu-pool", "--run-once"],
                            cwd=project.parent, env=worker_env, capture_output=True, text=True, timeout=300)
    assert worker.returncode == 0, worker.stdout + worker.stderr

    state = subprocess.run([sys.executable, "-c", (
        "import asyncio, json\n"
        "from prefect.client.orchestration import get_client\n"
        "async def main():\n"
        "    async with get_client() as c:\n"
        f"        run = await c.read_flow_run('{run_id}')\n"
        "        print(json.dumps({'state': run.state.type.value, 'deployment': str(run.deployment_id),\n"
        "                          'params': run.parameters}))\n"
        "asyncio.run(main())\n")], cwd=project, env=env, capture_output=True, text=True, check=True, timeout=60)
    info = json.loads(state.stdout.strip().splitlines()[-1])
    assert info["state"] == "COMPLETED", worker.stdout[-3000:] + worker.stderr[-3000:]
    assert info["params"]["stages"] == ["crawl"] and info["params"]["params_path"] == "params-gpu.yaml"
    shards = sorted((project / "data/crawl").glob("*.jsonl"))
    assert shards and json.loads(shards[0].read_text().splitlines()[0])["text"]
    assert json.loads((project / "reports/crawl.json").read_text())["kept"] > 0
    assert not (project / "data/tokenized").exists()              # only the requested stage ran
    assert os.path.exists(project / "mlflow.db")                  # ... and was tracked in the project
