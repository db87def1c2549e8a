"""The pipeline under real DVC (git repo, dvc repro / exp run / metrics / plots) and MLflow."""

import contextlib
import json
import posixpath
import re
import shutil
import sys
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from hatchling.config import load_params, validate_params
from hatchling.stages import STAGES, dvc_params, dvc_yaml, dvc_yaml_text, get_stage, topological_order, upstream
from tests.conftest import REPO, TINY_PARAMS, hatchling_cmd, run_cmd, write_params
from tests.test_kill import _files

DVC = [sys.executable, "-m", "dvc"]


def test_dvc_yaml_in_repo_is_generated_from_the_registry():
    run_cmd(hatchling_cmd("dvc-yaml", "--check"), REPO)
    on_disk = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert on_disk == dvc_yaml(load_params(REPO / "params.yaml"))
    assert list(on_disk["stages"]) == [s.name for s in STAGES]
    for s in STAGES:
        entry = on_disk["stages"][s.name]
        assert entry["cmd"] == f"python -m hatchling run {s.name}" and entry["params"] == dvc_params(s)
        assert entry["deps"][:len(s.deps)] == list(s.deps) and set(entry["deps"][len(s.deps):]) == set(s.code)
        for up in upstream(s):                       # an upstream stage is one that writes a declared dep
            assert set(next(x for x in STAGES if x.name == up).written.values()) & set(s.deps)
    assert [s.name for s in topological_order()] == ["crawl", "tasks", "dedup", "tokenize", "pretrain", "sft", "rlvr",
                                                     "eval", "export"]


def test_dvc_yaml_check_fails_when_stale(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    proc = run_cmd(hatchling_cmd("dvc-yaml", "--check", "--path", str(tmp_path / "dvc.yaml"), "--params",
                                 str(REPO / "params.yaml")), tmp_path, check=False)
    assert proc.returncode == 1 and "out of date" in proc.stderr


# -- files that params name are deps -------------------------------------------------------------------------------

#: values that look like paths but name none of the project's files
NOT_PROJECT_PATHS = ("crawl.mirror_start",       # a page inside the mirror
                     "crawl.license")            # license keywords such as creativecommons.org/licenses/by-nc
DATA_SUFFIXES = (".jsonl", ".gz", ".parquet", ".json", ".csv", ".txt", ".sqlite")


def path_like_values(params, stage) -> dict[str, str]:
    """Every value of the stage's params sections that looks like a path ("/" in it or a data file's suffix;
    no URL, no space, no scheme such as package:), by dotted key: found without the schema's reads_paths
    marks, so a path field left unmarked fails the tests below."""
    found = {}

    def walk(key, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{key}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{key}[{i}]", v)
        elif (isinstance(value, str) and ("/" in value or value.endswith(DATA_SUFFIXES)) and " " not in value
              and "://" not in value and not re.match(r"\w+:(?![/\\])", value)):
            found[key] = value

    for section in stage.params:
        walk(section, params.section(section))
    return {k: v for k, v in found.items() if not k.startswith(NOT_PROJECT_PATHS)}


def assert_param_paths_are_deps(params, document):
    for s in STAGES:
        deps = document["stages"][s.name]["deps"]
        assert len(deps) == len(set(deps)), s.name
        for key, path in path_like_values(params, s).items():
            path = posixpath.normpath(path)
            inside = [p for p in (*deps, *s.written.values()) if path == p or path.startswith(p.rstrip("/") + "/")]
            assert inside, f"stage {s.name} reads {key} = {path!r}, which is not among its deps {deps}"


def test_every_file_a_stage_param_names_is_among_its_deps():
    assert_param_paths_are_deps(load_params(REPO / "params.yaml"), yaml.safe_load((REPO / "dvc.yaml").read_text()))


def test_files_named_outside_the_declared_inputs_become_deps_and_dvc_takes_them(tmp_path):
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    tree["sft"] = {**tree["sft"], "data": ["chats/extra.jsonl", "data/tasks/sft_train.jsonl", "data/dedup/x.jsonl"],
                   "val_data": ["./chats/val.jsonl"]}
    tree["eval"] = {**tree["eval"], "gsm8k_fewshot_path": "fewshot/gsm8k_train.jsonl"}
    tree["benchmarks"] = {**tree["benchmarks"], "arc_easy": "/srv/evals/arc_easy.jsonl.gz"}
    tree["crawl"] = {**tree["crawl"], "mirror": "mirror/html"}
    params = validate_params(tree)
    document = dvc_yaml(params)
    assert_param_paths_are_deps(params, document)
    deps = {name: entry["deps"] for name, entry in document["stages"].items()}
    assert deps["sft"][:4] == ["checkpoints/pretrain", "data/tasks", "chats/extra.jsonl", "data/dedup/x.jsonl"]
    assert deps["sft"][4] == "chats/val.jsonl" and deps["sft"][5].startswith("hatchling/")
    assert {"fewshot/gsm8k_train.jsonl", "/srv/evals/arc_easy.jsonl.gz"} <= set(deps["eval"])
    assert "/srv/evals/arc_easy.jsonl.gz" in deps["tasks"] and "/srv/evals/arc_easy.jsonl.gz" in deps["dedup"]
    assert "mirror/html" in deps["crawl"] and "data/tasks/math_heldout.jsonl" not in deps["tasks"]   # its own output
    # DVC takes deps inside another stage's output (data/dedup/x.jsonl), inside a dep and outside the repo
    (tmp_path / "dvc.yaml").write_text(dvc_yaml_text(params))
    run_cmd(DVC + ["init", "--no-scm", "-q"], tmp_path)
    dag = run_cmd(DVC + ["dag", "sft"], tmp_path).stdout
    assert "dedup" in dag and "pretrain" in dag


def _mtimes(project: Path) -> dict:
    return {s.name: (project / s.metrics).stat().st_mtime_ns for s in STAGES}


def _runs(project: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hatchling")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_dvc_repro_noop_partial_rerun_metrics_plots_and_experiments(project):
    run_cmd(["git", "init", "-q"], project)
    run_cmd(DVC + ["init", "-q"], project)
    for name in ("config", "plots-offline.html"):             # the project's DVC settings, as a clone has them
        shutil.copy(REPO / ".dvc" / name, project / ".dvc" / name)
    shutil.copy(REPO / ".gitignore", project / ".gitignore")  # ... and what git leaves out: the MLflow store
    run_cmd(["git", "add", "-A"], project)
    run_cmd(["git", "commit", "-qm", "init"], project)

    run_cmd(DVC + ["repro"], project, timeout=600)
    for s in STAGES:
        assert (project / s.metrics).is_file(), s.name
    assert (project / "checkpoints/pretrain/model.safetensors").is_file()

    # MLflow: one parent run for this `dvc repro`, one child per stage, per-step metrics
    client, runs = _runs(project)
    parents = [r for r in runs if r.data.tags.get("hatchling.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].data.tags["hatchling.pipeline_key"].startswith("dvc:")
    assert parents[0].data.tags["mlflow.runName"] == "dvc repro"            # the commit's params, unchanged
    assert parents[0].data.tags["hatchling.orchestrator"] == "dvc" and parents[0].data.params["pretrain.lr"] == "0.003"
    assert "pretrain.val_bpb" in parents[0].data.metrics                    # the stages' headline numbers
    children = {r.data.tags["hatchling.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    assert set(children) == {s.name for s in STAGES}
    assert children["pretrain"].data.tags["mlflow.runName"] == "pretrain @ dvc repro"
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children.values())
    pre = children["pretrain"]
    history = client.get_metric_history(pre.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, TINY_PARAMS["pretrain"]["max_steps"] + 1))
    assert pre.data.params["pretrain.lr"] == "0.003" and pre.data.params["model.d_model"] == "32"
    assert len(pre.data.tags["hatchling.input_hash"]) == 64 and pre.data.tags["hatchling.git_commit"] != "unknown"
    with contextlib.chdir(project):     # MLflow reads the store-relative artifact location from here, as `mlflow ui`
        artifacts = {a.path for a in client.list_artifacts(pre.info.run_id)}
    assert {"pretrain.json", "pretrain.csv", "pretrain_eval.csv"} <= artifacts

    # nothing changed: a no-op that runs no stage
    before = _mtimes(project)
    t0 = time.perf_counter()
    proc = run_cmd(DVC + ["repro"], project)
    noop_seconds = time.perf_counter() - t0
    assert _mtimes(project) == before and "didn't change" in proc.stdout + proc.stderr
    print(f"dvc repro no-op: {noop_seconds:.2f}s")

    # one export param changed: only export reruns, everything upstream stays put
    params = {**TINY_PARAMS, "export": {**TINY_PARAMS["export"], "prompts": 2}}
    write_params(project, params)
    run_cmd(DVC + ["repro"], project, timeout=600)
    after = _mtimes(project)
    assert {k: v for k, v in after.items() if k != "export"} == {k: v for k, v in before.items() if k != "export"}
    assert after["export"] != before["export"]
    metrics = json.loads(run_cmd(DVC + ["metrics", "show", "--json"], project).stdout)
    flat = json.dumps(metrics)
    assert "val_loss" in flat and "bytes_per_token" in flat
    card = metrics[""]["data"]["reports/eval.json"]["data"]                  # "": the workspace
    assert set(card["scores"]) == set(TINY_PARAMS["eval"]["checkpoints"])       # benchmark scores as scalars
    assert isinstance(card["scores"]["sft"]["hatchling_math_t1"]["exact_match"], float)
    run_cmd(DVC + ["plots", "show", "-o", "plots_out"], project)
    html = (project / "plots_out" / "index.html").read_text()
    assert "train_loss" in html and "val_loss" in html and '"text": "pretrain: loss"' in html
    # renders offline: vega, vega-lite and vega-embed inlined, nothing loaded from elsewhere
    assert not re.findall(r"<script[^>]+src=", html) and "vega-embed 6.18.2 (npm" in html

    after = _mtimes(project)

    # a stage that fails under dvc repro (export, a bad param: exit 2 before any work) leaves its outputs as they
    # were: DVC, which deletes a stage's outputs before it runs, keeps them (persist), and the stage replaces them
    # only once it has ended well
    export = get_stage("export")
    kept = [*export.outs, *export.kept_in_git, export.metrics]
    before = _files(project, kept)
    write_params(project, {**params, "export": {**params["export"], "prompts": 0}})
    failed = run_cmd(DVC + ["repro"], project, timeout=600, check=False)
    assert failed.returncode != 0 and "export.prompts = 0" in failed.stdout + failed.stderr
    assert _files(project, kept) == before and _mtimes(project) == after
    write_params(project, params)

    # an ablation as a DVC experiment, run as a queued one is: DVC runs it in a temporary workspace under
    # .dvc/tmp/exps/ (`--temp` runs it as `dvc queue start` does, in the foreground) holding the commit,
    # the workspace's tracked changes and the DVC-cached outputs. Only export runs (the trainers' resume
    # state is no DVC output, so its absence there reruns nothing), and MLflow records into the project's store
    run_cmd(["git", "add", "-A"], project)
    run_cmd(["git", "commit", "-qm", "baseline"], project)
    proc = run_cmd(DVC + ["exp", "run", "--temp", "-S", "export.new_tokens=4", "-n", "temp4"], project, timeout=600)
    ran = re.findall(r"Running stage '(\w+)'", proc.stdout + proc.stderr)
    assert ran == ["export"], proc.stdout + proc.stderr
    shown = json.loads(run_cmd(DVC + ["exp", "show", "--json"], project).stdout)
    baseline = next(r for r in shown if r["rev"] != "workspace")
    (exp,) = [e["revs"][0] for e in baseline["experiments"] if e["name"] == "temp4"]
    assert exp["data"]["params"]["params.yaml"]["data"]["export"]["new_tokens"] == 4
    assert exp["data"]["metrics"]["reports/pretrain.json"]["data"]["steps"] == TINY_PARAMS["pretrain"]["max_steps"]
    # MLflow names the experiment's run by DVC's experiment name and the params it changed; the stages
    # DVC skipped as up to date are recorded under it as such
    client, runs = _runs(project)
    (parent,) = [r for r in runs if r.data.tags.get("hatchling.dvc_experiment") == "temp4"]
    assert parent.data.tags["mlflow.runName"] == "temp4: export.new_tokens=4"
    assert json.loads(parent.data.tags["hatchling.overrides"]) == ["export.new_tokens=4"]
    under = {r.data.tags["hatchling.stage"]: r for r in runs
             if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(under) == {s.name for s in STAGES}          # eval too, which does not read export: DVC skips it
    assert under["eval"].data.tags["hatchling.cache_reason"] == "skipped by DVC: outputs up to date"
    assert under["export"].data.tags["mlflow.runName"] == "export @ temp4"
    assert under["pretrain"].data.tags["hatchling.cache_reason"] == "skipped by DVC: outputs up to date"
    assert "hatchling.cached" not in under["export"].data.tags and under["pretrain"].data.tags["hatchling.cached"]
    with contextlib.chdir(project):     # the experiment's own metrics, in DVC and in MLflow, alike
        logged = json.loads(Path(client.download_artifacts(under["export"].info.run_id, "export.json")).read_text())
    assert exp["data"]["metrics"]["reports/export.json"]["data"] == logged
    assert _mtimes(project) == after                            # the workspace's outputs untouched

    # forced (`dvc repro --force`; the outputs are persisted, the run dir no output): the trainer
    # resumes its finished run and writes the same log and weights again; of the stages downstream only
    # eval is stale (it reads the pretrain report, whose timing changed), none that reads the weights
    weights = project / "checkpoints/pretrain/model.safetensors"
    logs, weight_bytes = (project / "logs/pretrain.csv").read_text(), weights.read_bytes()
    run_cmd(DVC + ["repro", "--force", "--single-item", "pretrain"], project, timeout=600)
    assert json.loads((project / "reports/pretrain.json").read_text())["resumed_from_step"] == \
        TINY_PARAMS["pretrain"]["max_steps"]
    assert (project / "logs/pretrain.csv").read_text() == logs and weights.read_bytes() == weight_bytes
    assert set(json.loads(run_cmd(DVC + ["status", "--json"], project).stdout)) == {"eval"}
    # MLflow: the forced stage ran, the stages upstream of it are recorded as skipped (those downstream DVC was
    # not asked about: their state waits on the forced stage's outputs)
    client, runs = _runs(project)
    forced = max((r for r in runs if r.data.tags.get("hatchling.kind") == "pipeline"), key=lambda r: r.info.start_time)
    under = {r.data.tags["hatchling.stage"]: r.data.tags.get("hatchling.cached", "ran") for r in runs
             if r.data.tags.get("mlflow.parentRunId") == forced.info.run_id}
    assert under == {"crawl": "true", "tasks": "true", "dedup": "true", "tokenize": "true", "pretrain": "ran"}
