"""Files a run writes: checked against the files it reads, written to a temp file beside their
destination and renamed into place, together.

A run never destroys what it was pointed at: every destination (the model, its ``.data``, the
report, an EP-context model) is refused when it is one of the files the run reads (the model, its
external data, the calibration and evaluation files, the config file, the metric script), also
through a hard or symbolic link, and when it exists but is not a regular file (a directory, a
FIFO, a device node: renaming a temp file over ``/dev/null`` would replace it).

Temp files are named ``.qcompile-<host>-<pid>-<random>.tmp``: short, so a legal 250-byte output
name is not pushed past the file system's 255 by the temp name, and owned, so the next run into
the same folder removes those whose process on this machine is gone (a run killed with SIGKILL
cannot remove its own). Files written together (a model and its report) are renamed one after
the other with SIGINT and SIGTERM held until both are in place: an interrupted run leaves both
files or neither; only SIGKILL or a power cut between the two renames (microseconds) leaves the
model without its report.

A model's report is ``<output name less .onnx>.report.json`` beside it (``report_path_for``), so
several models compiled into one folder keep one report each.
"""

from __future__ import annotations

__all__ = [
    "TEMP_PREFIX",
    "check_destination",
    "check_not_read",
    "external_data_files",
    "files_read",
    "remove_stale_temps",
    "rename_together",
    "report_path_for",
    "temp_beside",
    "write_text_atomically",
]

import contextlib
import hashlib
import os
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from qcompile.errors import OutputError

TEMP_PREFIX = ".qcompile-"
# Another machine's temp files (a shared folder) are removed only when this old: its process
# cannot be asked whether it still runs.
_FOREIGN_TEMP_SECONDS = 24 * 3600
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_swept: set[Path] = set()

# A file the run reads, and what it is to the user ("the input model", "the calibration file ...").
Read = tuple[Path, str]


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def check_destination(path: Path, *, reads: Sequence[Read] = (), flag: str | None = None) -> None:
    """An OutputError now, before any work, if ``path`` cannot be a file we write: its name is too
    long, its folder is missing, it is a directory, FIFO or device, or it is a file the run reads."""
    path = Path(path)
    name_bytes = len(os.fsencode(path.name))
    if path.parent.is_dir() and name_bytes > _name_max(path.parent):
        raise OutputError(
            f"Cannot write {str(path)!r}: its file name is {name_bytes} bytes, longer than the "
            f"{_name_max(path.parent)} this file system allows. Choose a shorter name"
            + (f" ({flag})." if flag else ".")
        )
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:
        raise OutputError(f"Cannot write {str(path)!r}: {str(path.parent)!r} is not a folder.") from None
    except OSError as error:
        raise OutputError(f"Cannot write {str(path)!r}: {error.strerror or error}.") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise OutputError(f"Cannot write {str(path)!r}: it is a directory. Give the path of a file (in it, if you like).")
    if mode is not None and _kind(mode):
        raise OutputError(
            f"Cannot write {str(path)!r}: it is {_kind(mode)}, not a regular file. qcompile writes a temp "
            "file and renames it over its destination, which would replace it; give the path of a file."
        )
    if not path.parent.is_dir():
        raise OutputError(f"Cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist.")
    if reads:
        check_not_read(path, reads, flag)


def check_not_read(path: Path, reads: Sequence[Read], flag: str | None = None) -> None:
    """An OutputError if writing ``path`` would replace one of the files the run reads."""
    for read, what in reads:
        if _same_file(Path(path), read):
            choose = f"; choose another {flag}" if flag else "; choose another path"
            raise OutputError(f"{flag + ' ' if flag else ''}{str(path)!r} would overwrite {what}{choose}.")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: equal once resolved, or links of one file."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, RuntimeError):
        return False


def external_data_files(model_path: Path) -> list[Path]:
    """The external data files an .onnx file names (its graphs' initializers), without reading
    them; empty when the file is not a readable model (the loader reports that)."""
    import onnx

    try:
        proto = onnx.load_model(str(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001  (the loader gives the error its own message)
        return []
    files = []
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location")
            if location:
                files.append(model_path.parent / location)
    return sorted(set(files))


def _data_files(source: Any) -> list[Path]:
    if isinstance(source, (str, Path)) and Path(source).is_file():  # a language model's calibration text
        return [Path(source)]
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        with contextlib.suppress(OSError):
            return sorted(p for p in Path(source).iterdir() if p.is_file())
    return []


def files_read(*, model: Any = None, external_data: Iterable[Path] | None = None, calibration: Any = None,
               evaluation: Any = None, config: Any = None, metric: str | None = None) -> list[Read]:
    """Every file a run reads, each with what it is to the user. ``external_data`` None: read the
    names from the model file."""
    reads: list[Read] = []
    if isinstance(model, (str, Path)):
        reads.append((Path(model), "the input model"))
        if external_data is None and Path(model).is_file():
            external_data = external_data_files(Path(model))
        reads += [(Path(p), f"the model's external data file {str(p)!r}") for p in external_data or ()]
    reads += [(p, f"the calibration file {str(p)!r}") for p in _data_files(calibration)]
    reads += [(p, f"the evaluation file {str(p)!r}") for p in _data_files(evaluation)]
    if isinstance(config, (str, Path)):
        reads.append((Path(config), f"the config file {str(config)!r}"))
    if metric and ":" in metric:
        script = metric.rsplit(":", 1)[0]
        if script.endswith(".py"):
            reads.append((Path(script), f"the metric script {script!r}"))
    return reads


def report_path_for(output: Path) -> Path:
    """Where a model's report goes by default: ``out/model.int8.onnx`` -> ``out/model.int8.report.json``
    (a name without ``.onnx`` keeps all of it: ``out/model`` -> ``out/model.report.json``)."""
    output = Path(output)
    stem = output.name[: -len(".onnx")] if output.name.lower().endswith(".onnx") and output.name[:-5] else output.name
    return output.with_name(f"{stem}.report.json")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process, or we cannot tell: keep its file
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temp files of qcompile runs that are gone (see the module docstring); the list
    of what was removed. Runs on this machine are asked by pid, other machines' files by age."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not (entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(".tmp")):
            continue
        parts = entry.name[len(TEMP_PREFIX):].split("-")
        try:
            host, pid = parts[0], int(parts[1])
            stale = not _alive(pid) if host == _HOST else now - entry.stat().st_mtime > _FOREIGN_TEMP_SECONDS
        except (IndexError, ValueError, OSError):
            continue
        if stale and pid != os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def temp_beside(path: Path) -> Path:
    """A new empty temp file in ``path``'s folder (so the rename is atomic), with the mode any new
    file gets; stale temps of dead runs in that folder are removed first (once per process)."""
    check_destination(path)
    folder = path.parent
    if folder.resolve() not in _swept:
        remove_stale_temps(folder)
        _swept.add(folder.resolve())
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{_HOST}-{os.getpid()}-", suffix=".tmp", dir=folder)
    except OSError as error:
        raise OutputError(f"Cannot write into {str(folder)!r}: {error.strerror}. Choose a writable folder.") from None
    os.close(fd)
    # mkstemp creates the file 0600; the output gets the mode any new file would (0666 less umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM that arrive during the block are delivered when it ends.

    Python runs signal handlers in the main thread, whichever thread the kernel picked (ONNX
    Runtime's and BLAS's threads included), so blocking the signals in this thread would not do:
    the handlers are swapped for one that notes the signal, and the signal is raised again, to the
    handlers of before, once the block is done. Other threads are never interrupted by Python
    handlers, so they need nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is not None:  # None: installed from C, which cannot be put back
            previous[signum] = signal.signal(signum, lambda number, frame: pending.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in pending:
            signal.raise_signal(signum)


def rename_together(moves: Sequence[tuple[Path, Path]]) -> None:
    """Rename each temp file onto its destination, in order, with SIGINT/SIGTERM held until all
    are in place (see the module docstring). The last destination is the one whose presence says
    the others are complete (the report, after its model)."""
    with _signals_held():
        for tmp, destination in moves:
            try:
                os.replace(tmp, destination)
            except OSError as error:
                raise OutputError(f"Cannot write {str(destination)!r}: {error.strerror or error}.") from None


def write_text_atomically(path: Path, text: str, *, reads: Sequence[Read] = (), flag: str | None = None) -> None:
    check_destination(Path(path), reads=reads, flag=flag)
    tmp = temp_beside(Path(path))
    try:
        try:
            tmp.write_text(text)
        except OSError as error:
            raise OutputError(f"Cannot write {str(path)!r}: {error.strerror or error}.") from None
        rename_together([(tmp, Path(path))])
    finally:
        tmp.unlink(missing_ok=True)
