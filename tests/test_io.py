"""hatchling.io's outputs_together: a stage's outputs go in place together when it ends well, or none of them."""

import json
import shutil

import pytest

from hatchling.io import atomic_path, atomic_write_text, complete, outputs_together, written

OLD = ({"a": "old"}, "old")
NEW = ({"a": "new", "b": "new"}, "new")


def outputs(tmp_path):
    """A directory output and a file output, holding their old versions."""
    shards, report = tmp_path / "shards", tmp_path / "report.json"
    shards.mkdir()
    (shards / "a").write_text("old")
    report.write_text("old")
    return shards, report


def write_new(shards, report) -> None:
    with atomic_path(shards) as tmp:
        tmp.mkdir()
        for name in ("a", "b"):
            (tmp / name).write_text("new")
    atomic_write_text(report, "first")
    atomic_write_text(report, "new")            # written again: this version replaces the one that waited


def state(shards, report):
    return {p.name: p.read_text() for p in sorted(shards.iterdir())}, report.read_text()


def test_outputs_wait_finished_and_go_in_place_together_at_the_end(tmp_path):
    shards, report = outputs(tmp_path)
    other, journal = tmp_path / "other.txt", tmp_path / ".hatchling" / "commit.json"
    with outputs_together([shards, report], journal, tmp_path):
        write_new(shards, report)
        atomic_write_text(other, "now")                     # not one of the outputs: in place at once
        assert state(shards, report) == OLD and other.read_text() == "now"
        assert state(written(shards), written(report)) == NEW and written(other) == other
    assert state(shards, report) == NEW
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hatchling", "other.txt", "report.json", "shards"]
    assert not journal.exists() and written(report) == report


def test_a_block_that_raises_leaves_every_output_as_it_was_and_no_temporary(tmp_path):
    shards, report = outputs(tmp_path)
    journal = tmp_path / "commit.json"
    with pytest.raises(ValueError, match="late"), outputs_together([shards, report], journal, tmp_path):
        write_new(shards, report)
        raise ValueError("late")
    assert state(shards, report) == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "shards"]


def half_moved(root):
    """What a run killed while putting its two new outputs in place leaves: the journal, the directory moved in,
    the report still waiting in its temporary sibling."""
    root.mkdir(exist_ok=True)
    shards, report = outputs(root)
    tmp = root / ".report.json.tmp-999999999-x" / "report.json"
    tmp.parent.mkdir()
    tmp.write_text("new")
    shutil.rmtree(shards)
    shards.mkdir()
    for name in ("a", "b"):
        (shards / name).write_text("new")
    journal = root / ".hatchling" / "commits" / "tokenize.json"
    journal.parent.mkdir(parents=True)
    journal.write_text(json.dumps({"shards": ".shards.tmp-999999999-y/shards",
                                   "report.json": ".report.json.tmp-999999999-x/report.json"}))
    return shards, report, journal


def test_a_half_moved_set_is_completed_also_in_a_moved_checkout(tmp_path):
    shards, report, journal = half_moved(tmp_path / "here")
    assert state(shards, report) == (NEW[0], "old")
    moved = tmp_path / "there"
    (tmp_path / "here").rename(moved)
    assert complete(moved / ".hatchling" / "commits" / "tokenize.json", moved) == ["report.json"]
    assert state(moved / "shards", moved / "report.json") == NEW
    assert sorted(p.name for p in moved.iterdir()) == [".hatchling", "report.json", "shards"]
    assert not list((moved / ".hatchling" / "commits").iterdir())


def test_a_stage_completes_its_half_moved_outputs_first_and_the_stages_after_it_wait_for_that(
        tmp_path, own_tracking, capsys):
    """The journal a run of tokenize killed mid-move left: pretrain, which reads tokenize's outputs, refuses to
    start (one line saying what to run); tokenize's next run puts the rest in place before anything else (here
    it then fails on its missing inputs, its outputs complete)."""
    from tests.conftest import TINY_PARAMS, hatchling_here, write_params

    write_params(tmp_path, TINY_PARAMS)
    shards, report, journal = half_moved(tmp_path)
    assert hatchling_here(tmp_path, "run", "pretrain") == 2
    assert capsys.readouterr().err == ("error: stage tokenize's last run was killed while putting its new outputs in "
                                       "place: run `hatchling run tokenize` (it completes them first), then this "
                                       "stage\n")
    assert hatchling_here(tmp_path, "run", "tokenize") == 2      # no data/dedup here
    assert state(shards, report) == NEW and not journal.exists()


def test_one_at_a_time(tmp_path):
    journal = tmp_path / "commit.json"
    with outputs_together([], journal, tmp_path), pytest.raises(RuntimeError, match="already within one"), \
            outputs_together([], journal, tmp_path):
        pass


def test_a_stage_that_fails_after_writing_its_outputs_leaves_all_of_the_previous_ones(
        pretrained_project, tmp_path, own_tracking, monkeypatch):
    """pretrain trains anew (other params: its checkpoint, logs and metrics would all differ) and writes every
    output, then MLflow fails to log its model: the stage fails, and each output is the previous run's. The
    rerun puts the new set in place."""
    import hatchling.registry
    from hatchling.stages import get_stage, run_stage
    from tests.conftest import TINY_PARAMS, copy_project, write_params
    from tests.test_kill import _files

    proj = copy_project(pretrained_project, tmp_path / "p")
    write_params(proj, {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "max_steps": 4}})
    stage = get_stage("pretrain")
    outputs = [*stage.outs, *stage.kept_in_git, stage.metrics]
    before = _files(proj, outputs)

    def store_down(*args, **kwargs):
        raise ConnectionError("the model store is down")

    monkeypatch.setattr(hatchling.registry, "log_model", store_down)
    with pytest.raises(ConnectionError, match="store is down"):
        run_stage("pretrain", root=proj)
    assert _files(proj, outputs) == before
    assert not [p for p in proj.rglob("*") if ".tmp-" in p.name], "the failed run left temporary files"
    monkeypatch.undo()
    assert run_stage("pretrain", root=proj)["steps"] == 4
    after = _files(proj, outputs)
    changed = {name.split("/model.")[0] for name in before if after[name] != before[name]}     # the tokenizer stays
    assert after.keys() == before.keys() and changed == {"checkpoints/pretrain", *outputs[1:]}
