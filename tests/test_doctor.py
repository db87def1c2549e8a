"""`hatchling doctor` and the lock file: every component really exercised, each required check
failing by name when its component is broken, and a lock that covers what pyproject declares."""

from __future__ import annotations

import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from hatchling import doctor as doc
from hatchling.cli import main
from tests.conftest import REPO, TINY_PARAMS, write_params

REQUIRED = [name for name, required, _ in doc.CHECKS if required]


def test_doctor_exercises_every_component(tmp_path, monkeypatch):
    """On the CI install (from the lock): every required component works, and the install is the lock."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    lines = []
    rows = doc.doctor(REPO, "params.yaml", out=lines.append)
    by_name = {r.component: r for r in rows}
    assert list(by_name) == [name for name, _, _ in doc.CHECKS]
    assert [r.component for r in rows if r.status == "FAIL"] == [], "\n".join(lines)
    assert by_name["install lock"].status == "ok", by_name["install lock"].detail
    assert "1 document kept" in by_name["scrapy crawl"].detail
    assert by_name["humaneval data"].detail == "164 problems, sha256 verified"
    assert by_name["torch"].version.startswith("2.13.0")
    assert lines[-1].endswith("0 failed")


def _break_import(monkeypatch, module: str):
    monkeypatch.setitem(sys.modules, module, None)      # `import module` now raises ImportError


def _break_scrapy(monkeypatch, tmp_path):
    """The spider's own process finds a scrapy that fails to import (as a moved dependency would)."""
    fake = tmp_path / "fake" / "scrapy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('scrapy is broken here on purpose')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))


def _break_dvc(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text("#!/bin/sh\necho 'dvc: cannot import dvc.cli' >&2\nexit 3\n")
    (bin_dir / "dvc").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))


def _break_mlflow(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's directory should be")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker / 'mlflow.db'}")


def _break_model(monkeypatch, tmp_path):
    write_params(tmp_path, {**TINY_PARAMS, "model": {"n_layers": 0}})


def _break_humaneval(monkeypatch, tmp_path):
    from hatchling.data import benchmarks

    monkeypatch.setitem(benchmarks.KNOWN_SHA256, benchmarks.PACKAGE_HUMANEVAL, "0" * 64)


def _break_sandbox(monkeypatch, tmp_path):
    from hatchling import sandbox

    monkeypatch.setattr(sandbox, "_interpreter", lambda: str(tmp_path / "no-python"))


BREAKERS = {
    "torch": (lambda mp, tmp: _break_import(mp, "torch"), "import torch: ModuleNotFoundError"),
    "model": (_break_model, "model.n_layers"),
    "extraction": (lambda mp, tmp: _break_import(mp, "trafilatura"), "import trafilatura"),
    "language id": (lambda mp, tmp: _break_import(mp, "py3langid"), "import py3langid"),
    "scrapy crawl": (_break_scrapy, "scrapy is broken here on purpose"),
    "mlflow store": (_break_mlflow, "not-a-dir"),
    "prefect": (lambda mp, tmp: _break_import(mp, "prefect"), "import prefect"),
    "dvc": (_break_dvc, "dvc: cannot import dvc.cli"),
    "sandbox": (_break_sandbox, "no-python"),
    "humaneval data": (_break_humaneval, "sha256"),
}


def test_every_required_check_has_a_breaking_test():
    assert sorted(BREAKERS) == sorted(REQUIRED)


@pytest.mark.parametrize("component", sorted(BREAKERS))
def test_a_broken_component_fails_its_check_by_name(component, tmp_path, monkeypatch):
    write_params(tmp_path, TINY_PARAMS)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    breaker, message = BREAKERS[component]
    breaker(monkeypatch, tmp_path)
    _, required, check = next(c for c in doc.CHECKS if c[0] == component)
    args = (tmp_path, "params.yaml") if check is doc.check_model else (tmp_path,)
    row = doc.run_check(component, required, check, *args)
    assert (row.component, row.status) == (component, "FAIL")
    assert message in row.detail
    assert "FAIL" in doc.format_row(row) and component in doc.format_row(row)


def test_exit_status_fails_on_required_only(tmp_path, monkeypatch, capsys):
    """A broken required component exits 1 naming it; a missing optional one only warns (exit 0)."""
    from hatchling.data.crawl import mirror

    monkeypatch.setattr(mirror, "PYTHON_DOC_DIR", tmp_path / "no-docs")
    monkeypatch.setattr(doc, "CHECKS", [c for c in doc.CHECKS if c[0] in ("extraction", "python3-doc")])
    monkeypatch.chdir(tmp_path)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "python3-doc" in out and "warn" in out and "fix: apt-get install python3-doc" in out
    _break_import(monkeypatch, "trafilatura")
    assert main(["doctor"]) == 1
    assert "1 failed: extraction" in capsys.readouterr().out


def test_lock_pins_every_declared_dependency():
    """requirements.lock satisfies pyproject's ranges (dependencies and the dev extra) and leaves
    torch to its own install step (the CPU build, README)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {canonicalize_name(k): v for k, v in doc.locked_versions(doc.LOCK_FILE.read_text()).items()}
    assert "torch" not in pins and not any(name.startswith("nvidia-") for name in pins)
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(spec)
        if req.name == "torch":
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not locked"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} breaks {req}"


def test_locked_versions_reads_pins_not_hashes_or_comments():
    text = "# via x\nabc-def==1.2.3 \\\n    --hash=sha256:00\nghi==4.0 ; python_version >= '3.11'\n    # via abc\n"
    assert doc.locked_versions(text) == {"abc-def": "1.2.3", "ghi": "4.0"}

