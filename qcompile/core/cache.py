"""The pass cache: results of passes already run, kept on disk under the content hash of their inputs.

Passes are deterministic (tests/test_reproducible.py), so the model and the shared state after pass
``i`` are a function of: the input model, the data, the config that passes read, the target, the
code (qcompile's source, its dependencies' versions), and passes ``0..i`` with their options.
``PipelineCache.keys`` folds these into one full sha256 per pass, chained: key ``i`` hashes key
``i-1`` and pass ``i``'s text form. A change anywhere invalidates that pass and every later one;
a change to a late pass's options keeps every earlier entry valid, so calibration is not run again.

An entry holds the model after the pass, the ``CompileContext`` state later passes read (analyses
such as the calibration table and the plan, records, the config, whether the data had been read),
and the timings of the passes it covers. Only passes worth keeping are stored: those that read
calibration data and those that took at least ``STORE_AFTER_SECONDS``. A run resumes after the
last stored pass of its pipeline. An entry whose checksum, size or format is wrong is logged,
deleted and recomputed, never used. Entries are written to a temporary folder and renamed into
place; the least recently used are deleted to keep the cache under its size limit, except those
another process is reading (readers hold a shared ``flock`` on the entry's header until its
weights are safe in their own memory or workspace), so concurrent compiles can share one cache. Large models'
weights are written and read tensor by tensor (no serialized copy of the whole model).

Entries hold pickled state: the cache folder must be the user's own (it is refused otherwise).
"""

from __future__ import annotations

__all__ = ["PassCache", "PipelineCache", "cache_directory"]

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

try:
    import fcntl
except ImportError:  # Windows: entries are still renamed into place, but not locked while read
    fcntl = None

from qcompile.core.config import NON_BUILD_KEYS
from qcompile.core.reproduce import canonical_json, file_digest, sha256_hex
from qcompile.io.workspace import (
    LARGE_MODEL_BYTES,
    release_tensor,
    serialize_inline,
    weight_bytes,
)

if TYPE_CHECKING:
    from qcompile.core.context import CompileContext
    from qcompile.core.pipeline import PassSpec, PassTiming

logger = logging.getLogger(__name__)

# Bump when the entry layout or what a key covers changes: old entries are then never read.
FORMAT = 2
_HEADER, _MODEL, _STATE = "header.json", "model.onnx", "state.pkl"
# Passes that read calibration data are always stored; others when they took at least this long.
STORE_AFTER_SECONDS = 1.0
# Temporary folders older than this are left over from a crashed process.
_STALE_TEMP_SECONDS = 3600


def cache_directory(configured: str | None = None) -> Path:
    """``cache_dir`` if set, else ``$QCOMPILE_CACHE_DIR``, else ``$XDG_CACHE_HOME/qcompile``, else ``~/.cache/qcompile``."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("QCOMPILE_CACHE_DIR"):
        return Path(os.environ["QCOMPILE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qcompile"


@dataclasses.dataclass
class CacheEntry:
    """What a run needs to continue after a pass as if it had run it."""

    model: ir.Model
    state: dict[str, Any]  # CompileContext state: analyses, records, config, data_read
    passes: list[dict[str, Any]]  # name, seconds (when it last ran), modified: passes 0..index


class PassCache:
    """Entries in one folder, one subfolder per key: ``header.json`` (the key, the passes covered,
    and the size and sha256 of every other file), ``model.onnx`` (with ``model.onnx.data`` for
    large models, whose weights are written and read tensor by tensor) and ``state.pkl``.
    ``load`` checks every size and checksum before anything is used.
    """

    def __init__(self, directory: Path, max_bytes: int):
        self.directory = directory
        self.max_bytes = max_bytes

    @classmethod
    def open(cls, root: Path, max_bytes: int) -> tuple[PassCache | None, str | None]:
        """The cache in ``root``, or None and why it cannot be used (a warning is logged)."""
        directory = root / f"passes-v{FORMAT}"
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            status = directory.stat()
        except OSError as error:
            why = f"cannot create {str(directory)!r}: {error.strerror or error}"
            logger.warning("pass cache off: %s. Set cache_dir (--cache-dir) or QCOMPILE_CACHE_DIR to a writable folder.", why)
            return None, why
        # Entries are unpickled: a folder someone else can write is refused.
        if (hasattr(os, "getuid") and status.st_uid != os.getuid()) or status.st_mode & 0o022:
            why = f"{str(directory)!r} is not private to this user (owner or group/other write permission)"
            logger.warning("pass cache off: %s. Use a folder of your own (cache_dir, --cache-dir) or chmod go-w it.", why)
            return None, why
        return cls(directory, max_bytes), None

    def path(self, key: str) -> Path:
        return self.directory / key

    def load(self, key: str) -> CacheEntry | None:
        """The entry for ``key``; None if there is none or it is damaged (then it is deleted).

        A large entry's weights stay in its files: read them inside ``reading`` (which keeps
        other processes from evicting the entry meanwhile), or not at all."""
        with self.reading(key) as entry:
            return entry

    @contextlib.contextmanager
    def reading(self, key: str):
        """The entry for ``key`` (or None), which no process evicts or deletes while the block runs:
        readers hold a shared lock on its header, ``evict`` deletes only entries it can lock
        exclusively. Entries appear by an atomic rename, so a reader sees a whole entry or none."""
        path = self.path(key)
        lock = _lock(path / _HEADER, exclusive=False)
        if lock is None:
            yield None  # no such entry, or it was evicted just now
            return
        try:
            try:
                entry = self._read(key, path)
            except Exception as error:  # noqa: BLE001  (any damage: missing file, size, checksum, unpickling)
                entry = None
                if path.is_dir():
                    logger.warning("pass cache: entry %s is damaged (%s); deleted, the passes run again", path, error)
                    _delete_unless_read(path, lock)
            if entry is not None:
                with contextlib.suppress(OSError):
                    os.utime(path / _HEADER)  # least recently used goes first: a hit makes the entry recent
            yield entry
        finally:
            lock.close()

    @staticmethod
    def _read(key: str, path: Path) -> CacheEntry:
        header = json.loads((path / _HEADER).read_bytes())
        if header.get("format") != FORMAT or header.get("key") != key:
            raise ValueError("written for another key or format")
        for name, (size, checksum) in header["files"].items():
            actual = (path / name).stat().st_size
            if actual != size:
                raise ValueError(f"{name} has {actual} bytes, the header says {size}")
            if file_digest(path / name) != checksum:
                raise ValueError(f"{name}: checksum mismatch")
        state = pickle.loads((path / _STATE).read_bytes())
        model = ir.load(path / _MODEL)  # large models: weights stay in the entry, mapped when read
        return CacheEntry(model, state, header["passes"])

    def store(self, key: str, entry: CacheEntry) -> bool:
        """Write ``entry`` under ``key`` (a temporary folder, renamed into place); False if not stored."""
        try:
            state_bytes = pickle.dumps(entry.state, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:  # noqa: BLE001  (e.g. a pass left something unpicklable in the context)
            logger.info("pass cache: the state after %s cannot be stored (%s)", entry.passes[-1]["name"], error)
            return False
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.directory))
            _write_model(entry.model, tmp)
            (tmp / _STATE).write_bytes(state_bytes)
            files = {f.name: (f.stat().st_size, file_digest(f)) for f in sorted(tmp.iterdir())}
            size = sum(s for s, _ in files.values())
            if size > self.max_bytes:
                logger.info("pass cache: an entry of %.1f MB exceeds the size limit (cache_max_mb); not stored", size / 1e6)
                return False
            (tmp / _HEADER).write_bytes(canonical_json({
                "format": FORMAT, "key": key, "files": files, "passes": entry.passes, "written": time.time(),
            }))
            try:
                os.rename(tmp, self.path(key))
                tmp = None
            except OSError:
                if not self.path(key).is_dir():
                    raise
                # Another process stored the same key meanwhile: its entry is as good as this one.
        except OSError as error:
            logger.warning("pass cache: cannot write into %s (%s); continuing without storing",
                           self.directory, error.strerror or error)
            return False
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        self.evict()
        return True

    def evict(self) -> None:
        """Delete least recently used entries (by the mtime of their header) until the cache fits ``max_bytes``."""
        entries, now = [], time.time()
        try:
            listing = list(os.scandir(self.directory))
        except OSError:
            return
        for item in listing:
            try:
                if item.name.startswith(".tmp-"):
                    if now - item.stat().st_mtime > _STALE_TEMP_SECONDS:
                        shutil.rmtree(item.path, ignore_errors=True)
                    continue
                size = sum(f.stat().st_size for f in os.scandir(item.path))
                entries.append((os.stat(os.path.join(item.path, _HEADER)).st_mtime, size, item.path))
            except OSError:
                continue  # deleted by another process meanwhile, or no header yet
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            lock = _lock(Path(path) / _HEADER, exclusive=True)
            if lock is None:
                continue  # another process is reading it (or deleted it): the next store evicts it
            with lock:
                logger.info("pass cache: evicting %s (%.1f MB) to stay under the size limit", path, size / 1e6)
                shutil.rmtree(path, ignore_errors=True)
            total -= size


def _lock(header: Path, *, exclusive: bool):
    """An open file holding a lock on an entry's header (shared: waits for a deletion to finish;
    exclusive: only if no one reads it), or None when the entry is gone or (exclusive) in use.
    Where there is no ``fcntl`` (Windows), the file is opened without a lock."""
    try:
        handle = open(header, "rb")  # noqa: SIM115  (closed by the caller)
    except OSError:
        return None
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
    except OSError:
        handle.close()
        return None
    if not header.exists():  # deleted while this process waited for its lock
        handle.close()
        return None
    return handle


def _delete_unless_read(path: Path, shared_lock) -> None:
    """Delete a damaged entry, unless another process is reading it (then it is theirs to judge)."""
    try:
        fcntl.flock(shared_lock, fcntl.LOCK_EX | fcntl.LOCK_NB) if fcntl is not None else None
    except OSError:
        return
    shutil.rmtree(path, ignore_errors=True)


def _write_model(model: ir.Model, directory: Path) -> None:
    """``model.onnx`` standing on its own: weights inline, or (large models) in ``model.onnx.data``
    written tensor by tensor, never as one serialized copy."""
    if weight_bytes(model) > LARGE_MODEL_BYTES:
        ir.save(model, directory / _MODEL, external_data=f"{_MODEL}.data")
        for value in model.graph.initializers.values():
            release_tensor(value.const_value)
        return
    # Weights still in the input's data file are read in: an entry must not depend on other files.
    (directory / _MODEL).write_bytes(serialize_inline(model).SerializeToString(deterministic=True))


class PipelineCache:
    """The pass cache as an instrument of one pipeline run: keys, the restore of the longest cached
    prefix, and stores after passes worth keeping. ``identity`` is everything but the passes that
    a run's results depend on (input model, data, target, versions, code: see qcompile.api)."""

    def __init__(self, cache: PassCache, identity: Mapping[str, Any]):
        self.cache = cache
        self.identity = dict(identity)
        self.restore_seconds = 0.0
        self.store_seconds = 0.0

    def keys(self, specs: Sequence[PassSpec], context: CompileContext) -> list[str]:
        # The config as the passes see it: resolved with the pipeline's run-wide pass options.
        config = {k: v for k, v in context.config.to_dict().items() if k not in NON_BUILD_KEYS}
        key = sha256_hex(canonical_json({"format": FORMAT, "config": config, **self.identity}))
        keys = []
        for spec in specs:
            key = sha256_hex(canonical_json([key, str(spec)]))
            keys.append(key)
        return keys

    def restore(self, keys: Sequence[str], context: CompileContext) -> tuple[int, ir.Model, list[dict]] | None:
        """Restore the latest entry among ``keys`` into ``context``: (its pass index, the model after
        it, the timings of passes 0..index), or None when no entry is usable."""
        start = time.perf_counter()
        try:
            for index in reversed(range(len(keys))):
                with self.cache.reading(keys[index]) as entry:
                    if entry is None:
                        continue
                    model, state = entry.model, entry.state
                    # Inside ``reading``, so that no process evicts the entry before its weights are safe.
                    if context.workspace is not None:
                        # Weights the entry keeps on disk are linked into the workspace, as the input's
                        # are: sessions read them there, and evicting the entry cannot pull them away.
                        context.workspace.adopt(model)
                    else:
                        model = ir.external_data.load_to_model(model)
                context.analyses = state["analyses"]
                context.records = state["records"]
                # The config is this run's: resolved before the key (so the stored run's build keys
                # are the same), and where work runs and how it is gated are this run's choice.
                if "calibrate" in context.records:
                    # How the stored run calibrated (executor, shards, seconds) is not how this one did.
                    context.records = {**context.records,
                                       "calibrate": {**context.records["calibrate"], "restored_from_cache": True}}
                if state["data_read"] and context.data is not None and not context.data.calibration_batches:
                    # The run that stored this had read the data by now; read it again (without
                    # running the model) so the held-out batches and counts are the same.
                    for _ in context.data.calibration():
                        pass
                logger.info("pass cache hit: %s restored the result of %d passes (up to %s) from %s",
                            keys[index][:12], index + 1, entry.passes[-1]["name"], self.cache.directory)
                return index, model, entry.passes
            return None
        finally:
            self.restore_seconds += time.perf_counter() - start

    @staticmethod
    def worth_storing(needs_data: bool, seconds: float) -> bool:
        return needs_data or seconds >= STORE_AFTER_SECONDS

    def store(self, key: str, model: ir.Model, context: CompileContext, timings: Sequence[PassTiming]) -> bool:
        start = time.perf_counter()
        state = {
            "analyses": context.analyses,
            "records": context.records,
            "data_read": bool(context.data is not None and context.data.calibration_batches),
        }
        passes = [{"name": t.name, "seconds": round(t.seconds if t.cache != "hit" else t.saved_seconds, 4),
                   "modified": t.modified} for t in timings]
        try:
            stored = self.cache.store(key, CacheEntry(model, state, passes))
        finally:
            self.store_seconds += time.perf_counter() - start
        if stored:
            logger.info("pass cache: stored the result of %s as %s", timings[-1].name, key[:12])
        return stored
