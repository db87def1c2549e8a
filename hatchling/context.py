"""What a stage function sees of the pipeline: its declared params sections, inputs and outputs, and
the hash of its code.

The registry (hatchling/stages.py) builds a :class:`StageContext` for each run; a stage reads
``ctx.params.<section>``, ``ctx.inputs.<name>`` and ``ctx.outputs.<name>`` and nothing else, so a
path or a section it did not declare is an error naming it rather than a silent dependency.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from hatchling.errors import StageError


class Declared(Mapping):
    """A stage's declared names -> values; reading an undeclared name is a StageError naming it."""

    def __init__(self, stage: str, kind: str, values: dict):
        self._stage, self._kind, self._values = stage, kind, values

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise StageError(f"stage {self._stage} reads {self._kind} {name!r}, which it does not declare "
                             f"(declared: {', '.join(self._values) or 'none'}; hatchling/stages.py)") from None

    def __getitem__(self, name: str):
        return self.__getattr__(name)

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


@dataclass(frozen=True)
class StageContext:
    """What a stage function gets: its declared params sections (typed), its inputs and outputs as
    paths under the root, the hash of its code, and where to log metrics. Nothing else of the
    pipeline is visible to it."""

    stage: str
    root: Path
    params: Declared
    inputs: Declared
    outputs: Declared
    code_hash: Callable[[], str]      # computes `code`, on first read
    log: Callable[[dict, int], None] = lambda metrics, step: None

    @cached_property
    def code(self) -> str:
        """sha256 of the stage's code files (Stage.code): a trainer resumes only a run of the same code.
        Computed when first read (the import closure takes 25-110 ms; only the trainers read it)."""
        return self.code_hash()

    def relative(self, path: Path) -> str:
        """`path` as recorded in outputs: relative to the root (outputs never name where the repo lives)."""
        return str(Path(path).relative_to(self.root))
