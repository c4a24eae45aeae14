"""Crash-safe file writes: a file is written beside its destination and renamed over it only
once complete, so a process killed mid-save leaves the previous file (or none), never half a
file. ``os.replace`` is atomic on POSIX and Windows within one file system."""
import contextlib
import os

__all__ = ["atomic_write"]


@contextlib.contextmanager
def atomic_write(path, binary=True):
    """``with atomic_write(path) as f: f.write(...)``: ``path`` appears, whole, at the end of the
    block; on an exception the temporary file is removed and ``path`` is left as it was."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
