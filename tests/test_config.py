"""params.yaml validation: each kind of bad value gets one clear error, before any work."""

import copy

import pytest
import yaml

from hatchling.config import ConfigError, Params, load_params, parse_override, validate_params
from tests.conftest import REPO, TINY_PARAMS, hatchling_cmd, hatchling_here, run_cmd, write_params


def test_repo_params_are_valid_and_are_the_toddler_run():
    p = load_params(REPO / "params.yaml")
    assert p.model.size == "toddler" and p.model.attn_every == 4
    assert p.pretrain.optimizer in ("adamw", "muon")


def _leaves(tree: dict, prefix: str = "") -> dict:
    return {k: v for key, value in tree.items()
            for k, v in (_leaves(value, f"{prefix}{key}.").items() if isinstance(value, dict)
                         else [(f"{prefix}{key}", value)])}


def test_gpu_profile_is_params_yaml_plus_what_it_lists():
    base, gpu = load_params(REPO / "params.yaml"), load_params(REPO / "params-gpu.yaml")
    listed = _leaves(yaml.safe_load((REPO / "params-gpu.yaml").read_text()))
    assert gpu.model.size == "xs" and gpu.pretrain.device == "cuda" and gpu.sft.device == "cuda"
    base_leaves = _leaves(base.model_dump())
    changed = {k for k, v in _leaves(gpu.model_dump()).items() if base_leaves.get(k) != v}
    # every difference is a key the profile names (model size also moves the preset's widths), or a
    # section's seed/device/progress inherited from a run-level key it names
    inherited = {k for k in changed if f"run.{k.rsplit('.', 1)[-1]}" in listed}
    assert {k for k in changed - inherited if not k.startswith("model.")} <= set(listed)
    assert all(k.endswith(".device") for k in inherited)


def test_pretrain_and_sft_share_the_train_section_and_override_it():
    tree = {**TINY_PARAMS, "train": {"batch_size": 5, "grad_clip": 0.5, "lr": 0.002},
            "pretrain": {"lr": 0.01}, "sft": {"data": ["a.jsonl"], "val_data": ["b.jsonl"], "grad_clip": 2.0}}
    params = validate_params(tree)
    assert (params.pretrain.batch_size, params.pretrain.grad_clip, params.pretrain.lr) == (5, 0.5, 0.01)
    assert (params.sft.batch_size, params.sft.grad_clip, params.sft.lr) == (5, 2.0, 0.002)
    with pytest.raises(ConfigError, match=r"train\.lr = -1"):
        validate_params({**tree, "train": {"lr": -1}})
    # the shipped params.yaml names each shared knob once
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    assert not set(shipped["train"]) & set(shipped["pretrain"]) and not set(shipped["train"]) & set(shipped["sft"])


def test_run_level_seed_device_and_progress_fill_what_a_section_leaves_unset():
    tree = {**TINY_PARAMS, "run": {"seed": 11, "device": "cpu", "progress": False},
            "rlvr": {k: v for k, v in TINY_PARAMS["rlvr"].items() if k != "seed"}}
    params = validate_params(tree)
    assert params.rlvr.seed == 11 and params.pretrain.seed == TINY_PARAMS["pretrain"]["seed"]   # its own wins
    assert params.pretrain.device == params.sft.device == "cpu"
    assert params.crawl.progress is False and params.eval.progress is False
    assert params.section("rlvr")["seed"] == 11          # what DVC, Prefect and MLflow see is the resolved value
    with pytest.raises(ConfigError, match=r"run\.device = 'tpu'"):
        validate_params({**tree, "run": {"device": "tpu"}})


def test_extends_merges_key_by_key_and_refuses_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**TINY_PARAMS, "pretrain": {
        **TINY_PARAMS["pretrain"], "lr": 0.01, "seq_len_curriculum": [[0, 16]]}}))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/profile.yaml").write_text(
        "extends: ../base.yaml\npretrain: {lr: 0.002, seq_len_curriculum: []}\n")
    p = load_params(tmp_path / "sub/profile.yaml", ["pretrain.max_steps=7"])
    assert (p.pretrain.lr, p.pretrain.seq_len_curriculum, p.pretrain.max_steps) == (0.002, [], 7)
    assert p.pretrain.batch_size == TINY_PARAMS["pretrain"]["batch_size"]         # the rest from the base
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_params(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: no such params file"):
        load_params(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: [a.yaml]\n")
    with pytest.raises(ConfigError, match="extends must name a params file"):
        load_params(tmp_path / "d.yaml")


def test_overrides_use_dvc_syntax_and_yaml_values(tmp_path):
    write_params(tmp_path, TINY_PARAMS)
    p = load_params(tmp_path / "params.yaml", ["pretrain.lr=3e-4", "model.n_layers=8",
                                               "pretrain.seq_len_curriculum=[[0, 16], [4, 32]]"])
    assert p.pretrain.lr == 3e-4 and p.model.n_layers == 8
    assert p.pretrain.seq_len_curriculum == [(0, 16), (4, 32)]
    assert parse_override("a.b=true") == ("a.b", True)


@pytest.mark.parametrize("override, message", [
    ("pretrain.lrr=0.1", "pretrain.lrr = 0.1: unknown key"),
    ("pretrain.lr=fast", "pretrain.lr = 'fast': Input should be a valid number"),
    ("pretrain.lr=-1", "pretrain.lr = -1: Input should be greater than 0"),
    ("pretrain.batch_size=2.5", "pretrain.batch_size = 2.5: Input should be a valid integer"),
    ("model.size=huge", "model.size = 'huge': Input should be 'toddler', 'xs' or 's'"),
    ("tokenize.vocab_size=100", "tokenize.vocab_size = 100: Input should be greater than or equal to 300"),
    ("pretrain.optimizer=sgd", "pretrain.optimizer = 'sgd': Input should be 'adamw', 'muon' or 'adapm'"),
    ("bogus.section=1", "bogus = {'section': 1}: unknown key"),
])
def test_bad_values_name_key_value_and_expectation(tmp_path, override, message):
    write_params(tmp_path, TINY_PARAMS)
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "params.yaml", [override])
    assert str(err.value).startswith(f"--set: {message}")
    key, value = parse_override(override)              # the same value written in the file is named by the file
    tree = copy.deepcopy(TINY_PARAMS)
    section, *rest = key.split(".")
    tree.setdefault(section, {})[rest[0]] = value
    write_params(tmp_path, tree)
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "params.yaml", ["sft.lr=0.01"])                # another key given on the line
    assert str(err.value).startswith(f"{tmp_path / 'params.yaml'}: {message}")


def test_a_bad_value_in_a_union_is_named_by_its_own_key(tmp_path):
    """eval.limit is a number or {task: number}: pydantic tags each member it tried onto the location."""
    write_params(tmp_path, {**TINY_PARAMS, "eval": {**TINY_PARAMS["eval"], "limit": {"default": 3}}})
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "params.yaml", ["eval.limit.arc_easy=x"])
    assert str(err.value).startswith("--set: eval.limit.arc_easy = 'x': Input should be a valid integer")
    assert "dict[" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("pretrain: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("pretrain.lr")
    # a section given twice: PyYAML would keep the second and drop the first without a word
    (tmp_path / "twice.yaml").write_text("pretrain:\n  warmup_steps: 30\nsft: {}\npretrain:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML: 'pretrain' is given twice in one mapping"):
        load_params(tmp_path / "twice.yaml")
    with pytest.raises(ConfigError, match=r"--set pretrain.betas: cannot parse .* as a value \('a' is given twice"):
        parse_override("pretrain.betas={a: 1, a: 2}")
    with pytest.raises(ConfigError, match=r"cannot read the params file: Is a directory"):
        load_params(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes("pretrain:\n  lr: 0.01 # d\xe9j\xe0\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text"):
        load_params(tmp_path / "latin1.yaml")


@pytest.mark.parametrize("overrides, message", [
    (["pretrain.betas=[1.5, 0.95]"], "pretrain: betas must each be in [0, 1), got [1.5, 0.95]"),
    (["pretrain.optimizer=adapm", "pretrain.adapm_beta_range=[0.95, 0.99]"],
     "pretrain: optimizer 'adapm' needs 0 <= adapm_beta_range[0] <= betas[0] <= adapm_beta_range[1] < 1, got betas "
     "[0.9, 0.95] and adapm_beta_range [0.95, 0.99]"),
    (["crawl.min_chars=5000", "crawl.max_chars=100"],
     "crawl: min_chars (5000) is above max_chars (100): every page would be dropped"),
    (["crawl.mirror=pydoc", "crawl.pydoc_modules=[]"],
     "crawl: mirror: auto/pydoc needs pydoc_modules (the pages of the fallback mirror)"),
    (["eval.needle_lengths=[128, -4]"], "eval.needle_lengths.1 = -4: Input should be greater than or equal to 1"),
    (["eval.forgetting_segments=1"], "eval: forgetting_segments must be 0 (off) or at least 2"),
    (["eval.humaneval_samples=2", "eval.humaneval_k=[5]"],
     "eval: humaneval_k [5] must lie in 1..humaneval_samples (2)"),
    (["model.arch=gpt", "model.chunk_size=32", "model.head_dim=5"],
     "model: head_dim (5) must be even for arch 'gpt' (RoPE rotates pairs)"),
    (["pretrain.parallel=fsdp", "pretrain.optimizer=muon"],
     "pretrain: parallel 'fsdp' supports optimizer 'adamw' without sparsity (Muon, AdaPM and the sparsity masks work "
     "on whole matrices)"),
    (["pretrain.seq_len_curriculum=[[10, 32], [5, 64]]"],
     "pretrain: seq_len_curriculum must be [[step, seq_len>=2], ...] with increasing steps, got [[10, 32], [5, 64]]"),
])
def test_values_that_cannot_work_together_are_refused_before_any_work(tmp_path, overrides, message):
    """Each used to pass the schema and fail late: the optimizers' raw ValueError, a crawl that drops every
    page, the eval's needle after loading its checkpoints, RoPE in the first forward pass. The message is
    one line: the section and the rule, not the whole section's values."""
    write_params(tmp_path, TINY_PARAMS)
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "params.yaml", overrides)
    assert str(err.value) == f"--set: {message}"


def test_a_long_bad_value_is_shown_cut_short(tmp_path):
    write_params(tmp_path, TINY_PARAMS)
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "params.yaml", [f"pretrain.lr={'x' * 1000}"])
    assert str(err.value) == f"--set: pretrain.lr = '{'x' * 199}...: Input should be a valid number, unable to parse " \
                             "string as a number"


def test_cli_rejects_bad_params_before_work_and_leaves_outputs(tokenized_project):
    """A bad value stops `hatchling run` with exit 2 and one line, and no output changes."""
    before = {p: p.read_bytes() for p in (tokenized_project / "data").rglob("*") if p.is_file()}
    reports = sorted((tokenized_project / "reports").glob("*.json"))
    report_bytes = [r.read_bytes() for r in reports]
    proc = run_cmd(hatchling_cmd("run", "tokenize", "--set", "tokenize.vocab_size=ten"), tokenized_project,
                   check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --set: tokenize.vocab_size = 'ten': "
        "Input should be a valid integer, unable to parse string as an integer"]
    after = {p: p.read_bytes() for p in (tokenized_project / "data").rglob("*") if p.is_file()}
    assert after == before
    assert [r.read_bytes() for r in reports] == report_bytes
    assert not (tokenized_project / "checkpoints").exists()


def test_params_file_in_repo_matches_schema_keys():
    """Every section in params.yaml is one the schema knows (and none is missing)."""
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(tree) == set(Params.model_fields)


def test_cli_prints_the_traceback_of_an_unexpected_error(project, monkeypatch, capsys):
    """A bug deep in a stage (here a shape error) is not dressed up as a bad param: exit 1, with
    the traceback down to where it was raised; an expected error stays one line (exit 2)."""
    from hatchling.data.crawl import stage as crawl_stage

    def deep_in_training(ctx):
        def mix(a, b):
            raise ValueError(f"shapes {a} and {b} cannot be multiplied")
        return mix([2, 3], [2, 3])

    monkeypatch.setattr(crawl_stage, "run", deep_in_training)
    assert hatchling_here(project, "run", "crawl") == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert 'in mix\n    raise ValueError(f"shapes {a} and {b} cannot be multiplied")' in err
    assert "ValueError: shapes [2, 3] and [2, 3] cannot be multiplied" in err
    assert err.strip().splitlines()[-1].startswith("error: unexpected ValueError")
    # ... and the stage's MLflow run (and its pipeline run) end FAILED carrying the error
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    (stage_run,) = client.search_runs([client.get_experiment_by_name("hatchling").experiment_id],
                                      filter_string="tags.`hatchling.stage` = 'crawl'")
    parent = client.get_run(stage_run.data.tags["mlflow.parentRunId"])
    message = "ValueError: shapes [2, 3] and [2, 3] cannot be multiplied"
    assert stage_run.info.status == parent.info.status == "FAILED"
    assert stage_run.data.tags["hatchling.error"] == parent.data.tags["hatchling.error"] == message
    assert message in stage_run.data.tags["mlflow.note.content"]
    assert parent.data.tags["hatchling.failed_stage"] == "crawl"

    assert hatchling_here(project, "run", "tokenize") == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: stage tokenize needs data/dedup (output of stage dedup: run `hatchling run dedup` first)"]
