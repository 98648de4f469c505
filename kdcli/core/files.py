"""Writes that a crash cannot leave half done: a temporary file in the same directory, then
a rename over the target. A full disk is reported as such, with the previous file intact."""

from __future__ import annotations

import csv
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from kdcli.core import distributed
from kdcli.core.errors import KdError

# The errors of a write that more space (or a larger quota or file-size limit) would have let through.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def no_space(path: Path) -> KdError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return KdError(
        f"No space left to write {path} ({free} on that disk). The previous version of the file, if any, is "
        "intact. Free some space (or set runs_dir=... to another disk), then continue the run with resume=auto."
    )


def space_error(e: BaseException) -> bool:
    """Whether `e`, or an error it was raised from, is a write that more space would have let
    through: torch's zip writer turns the OSError of a full disk into a RuntimeError
    ("[enforce fail at inline_container.cc...] unexpected pos"), whose context keeps it."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return True
        e = e.__cause__ or e.__context__
    return False


START_FREE = 2**20  # the space a run needs to start: its config files and metrics.json

# The longest file name (bytes) of the usual Linux, macOS and Windows file systems.
NAME_MAX = 255


def check_makeable(path: Path, key: str) -> None:
    """That directory `path` (the value of `key`) can be made: each name fits, and the nearest
    folder above it that exists is a directory this process may write in. Asked by trying, since
    permissions alone do not tell (root, read-only mounts)."""
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise _unusable(key, path, f"a name of {len(os.fsencode(part))} bytes; at most {NAME_MAX} fit")
    for folder in (path, *path.parents):
        try:
            st = os.stat(folder)
        except FileNotFoundError:
            if os.path.lexists(folder):
                raise _unusable(key, path, f"{folder} is a broken symbolic link") from None
            continue
        except OSError as e:  # a symbolic link loop, a file where a folder should be, a denied search
            raise _unusable(key, path, f"{e.strerror}: {e.filename}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise _unusable(key, path, f"{folder} is not a directory")
        try:
            os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".kdcli-check-"))
            free = shutil.disk_usage(folder).free
        except OSError as e:
            raise _unusable(key, path, f"{folder}: {e.strerror}") from None
        if free < START_FREE:  # Hydra's first files would fail with a traceback
            raise KdError(
                f"No space left to write {path} ({free / 2**20:.1f} MiB free on that disk; a run needs at least "
                f"{START_FREE / 2**20:g} MiB to start). Free some space, or set runs_dir=... to another disk."
            )
        return


def _unusable(key: str, path: Path, why: str) -> KdError:
    return KdError(
        f"{key}: cannot make the run directory {path} ({why}). Give {key}= a directory you can write to "
        "(runs_dir=PATH, or the environment variable KDCLI_RUNS)."
    )


def shown(value: object, limit: int = 80) -> str:
    """A value as an error message quotes it: a 5000-character path is cut to its start."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_path(key: str, value: str) -> None:
    """A path from the config that the system will not even look up (a name too long, a symbolic
    link loop, a folder this user may not search, a NUL) is one error naming the key. A path that
    does not exist is left to the command, which says where it looked."""
    if "\x00" in value:
        raise KdError(f"{key}: the path holds a NUL character. Give a path without one.")
    try:
        os.stat(Path(value).expanduser())
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as e:
        raise KdError(f"{key}={shown(value)}: {e.strerror}. Give a path that can be opened.") from None


# A name read from a file becomes at most this many characters of a file name: with a suffix
# (".int8-dynamic.onnx") and atomic_write's ".<name>.<pid>-<random>.tmp" it stays under 255 bytes.
NAME_LIMIT = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_name(text: object, fallback: str = "model", limit: int = NAME_LIMIT) -> str:
    """`text`, a name read from a file (a checkpoint's role or arch, a class name), as one harmless
    path component: letters, digits and ._+- only (no separator, no NUL), no `..`, no leading
    dot or dash, at most `limit` characters, never empty. A file decides what it calls itself,
    never where kdcli writes; ordinary names (mlp_student) come back unchanged."""
    name = re.sub(r"\.{2,}", ".", _UNSAFE.sub("_", str(text))).lstrip("._-").rstrip(".")
    if len(name) > limit:  # cut, with a digest of the whole so that two long names stay apart
        digest = hashlib.sha256(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:8]
        name = f"{name[: limit - 9].rstrip('.')}-{digest}"
    return name or fallback


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask is process-wide, and threads may write at the same time


def _writer_alive(rest: str) -> bool:
    """Whether the process named by a temporary file's "<pid>-<random>.tmp" still runs here."""
    pid = rest.split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`:
    a crash mid-write leaves the previous file intact. A full disk raises a KdError. Under
    several processes (torchrun) only rank 0 writes: the others' writes are dropped."""
    if not distributed.is_main():
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The writer's pid in the name: a later write removes only the leftovers of dead writers
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        if space_error(e):
            raise no_space(path) from None
        raise
    try:
        write(tmp)
        # mkstemp makes it private; the file gets the usual permissions. After the write: a writer
        # may replace the file with its own (safetensors' save_file does), which is private too.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a process killed mid-write
            if not _writer_alive(stale.name[len(path.name) + 2 :]):  # not another process's write in progress
                stale.unlink(missing_ok=True)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if space_error(e):
            raise no_space(path) from None
        raise


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_csv(path: Path, fieldnames: list[str], rows: list[dict]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file ([] if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_jsonl(path: Path, row: dict) -> None:
    """Append one row, rewriting the (small) file atomically: a kill never leaves half a line."""
    if not distributed.is_main():  # several processes: rank 0 writes (and reads the file for it)
        return
    write_jsonl(path, read_jsonl(path) + [row])
