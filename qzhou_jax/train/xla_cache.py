"""XLA's persistent compilation cache of a run: where it is, and entries that cannot be read.

JAX writes a cache entry in place, not through a temporary name, so a process killed while
writing one, or a host that crashed before the file reached its disk, leaves a truncated or
empty entry. JAX then warns ("Error reading persistent compilation cache entry") and compiles
again at every start, and never writes the entry again, since the file exists: a restarted run
pays the whole compilation on each restart. `drop_unreadable_entries` removes such entries
before the run compiles: each entry it has not seen is decompressed once, and the entries found
whole are listed, with their size and modification time, in `.qzhou-checked.json` in the cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import jax

from qzhou_jax.config import atomic_write

log = logging.getLogger(__name__)

SUFFIX = "-cache"  # JAX's name for an entry: <module>-<key>-cache
CHECKED = ".qzhou-checked.json"
SETTLE_S = 120  # an entry modified this recently may be one another run is writing now


def use(cache_dir: str | None) -> None:
    """Make `cache_dir` (user and variables expanded) JAX's cache, unless the environment names
    one (JAX_COMPILATION_CACHE_DIR). Call before anything is compiled."""
    if cache_dir and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        from qzhou_jax.train.config import expand_path

        jax.config.update("jax_compilation_cache_dir", expand_path(cache_dir))


def drop_unreadable_entries(cache_dir: str | None = None) -> list[str]:
    """Remove the entries of the cache (default: JAX's current one) that do not decompress;
    returns their names. Only a local folder is checked; nothing happens without JAX's
    decompression function (a JAX without it) or without the folder."""
    cache_dir = cache_dir or jax.config.jax_compilation_cache_dir
    if not cache_dir or "://" in cache_dir or not os.path.isdir(cache_dir):
        return []
    try:
        from jax._src.compilation_cache import decompress_executable
    except ImportError:
        return []
    record = os.path.join(cache_dir, CHECKED)
    try:
        with open(record, encoding="utf-8") as f:
            checked = json.load(f)
        if not isinstance(checked, dict):
            checked = {}
    except (OSError, ValueError):
        checked = {}
    seen, dropped, now = {}, [], time.time()
    for entry in os.scandir(cache_dir):
        if not entry.name.endswith(SUFFIX) or not entry.is_file():
            continue
        try:
            st = entry.stat()
            mark = [st.st_size, st.st_mtime_ns]
            if checked.get(entry.name) == mark:
                seen[entry.name] = mark
                continue
            if now - st.st_mtime < SETTLE_S:
                continue  # perhaps being written; checked at a later start
            with open(entry.path, "rb") as f:
                data = f.read()
        except OSError:  # removed by another process, or not ours to read: JAX decides
            continue
        try:
            decompress_executable(data)
        except Exception as e:  # zlib.error, zstd.ZstdError: a truncated or empty entry
            try:
                os.remove(entry.path)
            except FileNotFoundError:
                pass
            except OSError as gone:  # a cache shared read-only: JAX warns and compiles, as before
                log.warning("%s: unreadable XLA cache entry (%s), and it cannot be removed: %s", entry.path, e, gone)
                continue
            dropped.append(entry.name)
            log.warning("%s: removed an unreadable XLA cache entry (%s bytes: %s); it is compiled and "
                        "written again", entry.path, st.st_size, e)
            continue
        seen[entry.name] = mark
    if seen != checked:
        with contextlib.suppress(OSError), atomic_write(record) as f:  # a read-only cache: checked again next time
            json.dump(seen, f)
    return dropped
