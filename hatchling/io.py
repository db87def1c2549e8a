"""Atomic writes, JSONL shards and content hashes.

Every output is written to a temporary sibling and renamed into place, so a stage that fails
(or is killed) leaves either the previous output or the new one, never half a file. A full disk
(ENOSPC), a file-size limit (EFBIG) or a quota (EDQUOT) met while writing one is raised as one
DiskFullError naming the output, after the temporary files are removed. Within
:func:`outputs_together` (a stage's run) the finished temporaries of its outputs wait and are put
in place together when the stage has ended well, so a stage that fails or is killed leaves the
whole set of its previous outputs, never some new and some old.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import glob
import hashlib
import io
import json
import os
import re
import resource
import shutil
import tempfile
import traceback
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from hatchling.errors import DiskFullError, HatchlingError, InputError

FULL_DISK = {errno.ENOSPC: "no space left on the device (ENOSPC)",
             errno.EFBIG: "a file reached the file-size limit (EFBIG)",
             errno.EDQUOT: "the disk quota is exceeded (EDQUOT)"}
NEARLY_FULL = 1 << 20       # bytes free under which a write that failed without an errno is put down to the disk


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and the errors it was raised from or while handling."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _full_disk_errno(error: BaseException, tmp: Path | None) -> int | None:
    """The errno of a full disk behind `error` (or its causes), else None. Writers in C or Rust hide
    it: safetensors says "(os error 28)" in its message, numpy's tofile and torch.save only that a
    write fell short; for those, whether the disk is (nearly) full or a file under `tmp` has reached
    the file-size limit is checked while the temporary files are still there."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in FULL_DISK:
            return e.errno
        if (m := re.search(r"os error (\d+)", str(e))) and int(m.group(1)) in FULL_DISK:
            return int(m.group(1))
    if not isinstance(error, (OSError, RuntimeError)) or tmp is None:
        return None
    with contextlib.suppress(OSError):
        st = os.statvfs(tmp)
        free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
        if (st.f_blocks and free < NEARLY_FULL) or (st.f_files and not st.f_favail):
            return errno.ENOSPC
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        with contextlib.suppress(OSError):
            if any(f.is_file() and f.stat().st_size >= limit for f in tmp.rglob("*")):
                return errno.EFBIG
    return None


def _raise_if_full_disk(error: Exception, path: Path, existed: bool, tmp: Path | None) -> None:
    if isinstance(error, HatchlingError) or (code := _full_disk_errno(error, tmp)) is None:
        return
    kept = f"the previous {path.name} is kept as it was" if existed else f"{path.name} was not created"
    full = DiskFullError(f"cannot write {path}: {FULL_DISK[code]}; {kept} and no partial file is left "
                         f"(free space or raise the limit, then rerun)")
    full.errno = code
    for e in _chain(error):         # so that a writer's open handle on a temp file gives its space back now
        traceback.clear_frames(e.__traceback__)
    raise full from error


TEMP = ".tmp-"           # .NAME.tmp-PID-XXXX: a writer's temporary sibling of NAME
PREVIOUS = ".previous-"  # inside it, .previous-NAME: the old NAME, while it cannot be exchanged in one call


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # another user's process
        return True
    return True


def sweep(path: Path) -> None:
    """Clear what a writer of `path` killed mid-write left beside it: its temporary sibling, and,
    had it been killed between moving the old `path` aside and putting the new one in place (where
    the two cannot be exchanged in one call), the old `path`, which goes back."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}{TEMP}*"):
        pid = tmp.name[len(path.name) + 1 + len(TEMP):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        previous = tmp / f"{PREVIOUS}{path.name}"
        if not os.path.lexists(path) and os.path.lexists(previous):
            previous.rename(path)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` (file or directory) in one
    step. On any failure the temporary path is removed and `path` is left as it was; a full disk is
    raised as DiskFullError naming `path`. A writer killed at any moment leaves `path` as it was (or
    complete, once replaced) and a temporary sibling, which the next write of `path` removes."""
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep(path)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}{TEMP}{os.getpid()}-", dir=path.parent))
    except OSError as error:
        _raise_if_full_disk(error, path, existed, None)
        raise
    tmp = tmp_dir / path.name
    waits = False
    try:
        try:
            yield tmp
            if _together is not None and os.path.abspath(path) in _together:
                _together.wait(path, tmp)
                waits = True
            else:
                _swap(tmp, path)
        except Exception as error:
            _raise_if_full_disk(error, path, existed, tmp_dir)
            raise
    finally:
        if not waits:
            shutil.rmtree(tmp_dir, ignore_errors=True)


class _Together:
    """The outputs of one :func:`outputs_together` and, for those written so far, their finished temporaries."""

    def __init__(self, paths: Iterable[str | Path]):
        self.paths = {os.path.abspath(p) for p in paths}
        self.waiting: dict[str, Path] = {}          # output -> its new version, in its temporary sibling

    def __contains__(self, path: str) -> bool:
        return path in self.paths

    def wait(self, path: Path, tmp: Path) -> None:
        """`tmp` is `path`'s new version (one written again replaces the version that waited)."""
        earlier = self.waiting.pop(os.path.abspath(path), None)
        if earlier is not None:
            shutil.rmtree(earlier.parent, ignore_errors=True)
        self.waiting[os.path.abspath(path)] = tmp

    def drop(self) -> None:
        for tmp in self.waiting.values():
            shutil.rmtree(tmp.parent, ignore_errors=True)
        self.waiting.clear()


_together: _Together | None = None


def written(path: str | Path) -> Path:
    """Where `path`'s newest version is: within :func:`outputs_together`, an output written there waits in its
    temporary sibling until the set is put in place; anything else is where it is."""
    if _together is not None and (tmp := _together.waiting.get(os.path.abspath(path))) is not None:
        return tmp
    return Path(path)


@contextlib.contextmanager
def outputs_together(paths: Sequence[str | Path], journal: str | Path, root: str | Path) -> Iterator[None]:
    """Within: each atomic write of one of `paths` (a stage's outputs, under the project `root`) waits, finished,
    in its temporary sibling (:func:`written` says where) instead of replacing the output. At the end, if the
    block ended well, all of them are put in place at once: their list is first written to `journal`, relative
    to `root` (the checkout may move), so that a process killed while moving them leaves what :func:`complete`
    finishes; if the block raised, or the process is killed before that, every output stays as it was and the
    temporaries go (sweep removes what a killed process left)."""
    global _together
    if _together is not None:
        raise RuntimeError("outputs_together: already within one")
    _together = together = _Together(paths)
    try:
        yield
    except BaseException:
        together.drop()
        raise
    finally:
        _together = None
    if together.waiting:
        try:
            atomic_write_json(journal, {os.path.relpath(path, root): os.path.relpath(tmp, root)
                                        for path, tmp in together.waiting.items()})
        except BaseException:
            together.drop()
            raise
        complete(journal, root)


def complete(journal: str | Path, root: str | Path) -> list[str]:
    """Put in place the outputs that `journal` lists (see :func:`outputs_together`) and remove it; the outputs
    that were still to move: those a process killed midway left (none, if there is no journal). A file is
    renamed over the old one; a directory's old version is moved aside into the temporary's folder first (so
    a new version still waiting is always the temporary, and the old one there goes with the folder)."""
    journal = Path(journal)
    if not journal.exists():
        return []
    moved = []
    for rel_path, rel_tmp in json.loads(journal.read_text()).items():
        path, tmp = Path(root) / rel_path, Path(root) / rel_tmp
        if os.path.lexists(tmp):
            moved.append(rel_path)
            if path.is_dir() and not path.is_symlink():
                path.rename(tmp.with_name(f"{PREVIOUS}{path.name}"))
            os.replace(tmp, path)
        shutil.rmtree(tmp.parent, ignore_errors=True)
    journal.unlink()
    return moved


RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux's renameat2 with RENAME_EXCHANGE); False where the
    system or the filesystem cannot."""
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(-100, os.fsencode(a), -100, os.fsencode(b), RENAME_EXCHANGE) == 0:     # -100: AT_FDCWD
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _swap(tmp: Path, path: Path) -> None:
    """Put `tmp` in the place of `path`. A file is replaced by a rename; a directory is exchanged with
    `tmp` (which then holds the old one, removed with it), or, where that cannot be done in one step,
    moved aside beside `tmp` first (and back if the rename fails; see sweep for a kill in between)."""
    if not (path.is_dir() and not path.is_symlink()):
        os.replace(tmp, path)
    elif not exchange(tmp, path):
        previous = tmp.with_name(f"{PREVIOUS}{path.name}")
        path.rename(previous)
        try:
            tmp.rename(path)
        except BaseException:
            previous.rename(path)
            raise


def new_file_mode() -> int:
    """The mode open() gives a new file here, 0666 less this process's umask (which Linux reports in
    /proc/self/status; reading it there leaves the umask alone for other threads): safetensors writes 0600."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    return 0o644


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_csv(path: str | Path, rows: list[dict]) -> None:
    """Rows as CSV with a header; the columns: every key any row has, in the order they first appear.
    No rows: an empty file."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    if rows:
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """The objects of a JSONL file, one a line (blank lines skipped); a line that is not UTF-8, not
    JSON or not a JSON object is refused as ``path:line: what is wrong``."""
    yield from (record for _, record in numbered_jsonl(path))


def numbered_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL file, with :func:`read_jsonl`'s errors."""
    with open(path, "rb") as f:
        yield from jsonl_records(f, path)


def jsonl_records(lines: Iterable[bytes], path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of JSONL bytes read from `path` (a file, or the
    decompressed content of one), with :func:`read_jsonl`'s errors."""
    for lineno, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (about 1 GB/s: seconds for a big checkpoint)."""
    return _hashed(hashlib.sha256(), path).hexdigest()


def _hashed(h, path: str | Path):
    """`h` updated with the bytes of the file at `path`, a 1 MiB block at a time."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h


def sha1_text(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def hash_paths(paths: Iterable[str | Path], root: str | Path) -> str:
    """sha256 over the bytes of files and their paths relative to `root` (directories walked in sorted
    order), so the same tree hashes the same wherever it lives. `paths` are relative to `root` (or
    absolute); a file outside `root` is named relative to the folder that holds the given path."""
    root = Path(root).resolve()
    h = hashlib.sha256()
    named = []
    for given in paths:
        path = root / given
        full = path.resolve()
        label = full.relative_to(root) if full.is_relative_to(root) else Path(full.name)
        if path.is_dir():
            named += [((label / f.relative_to(path)).as_posix(), f) for f in path.rglob("*") if f.is_file()]
        elif path.exists():
            named.append((label.as_posix(), path))
    for name, f in sorted(named):
        h.update(name.encode() + b"\0")
        _hashed(h, f)
    return h.hexdigest()
