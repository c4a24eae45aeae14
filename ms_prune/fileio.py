"""Crash-safe file writes: a file is written beside its destination and renamed over it only
once complete, so a process killed mid-save leaves the previous file (or none), never half a
file. ``os.replace`` is atomic on POSIX and Windows within one file system."""
import contextlib
import hashlib
import json
import os
import re
import shutil

__all__ = ["atomic_write", "atomic_directory", "clean_orphans", "write_checksums", "read_checksums",
           "verify_checksums"]


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


CHECKSUMS = "checksums.json"


@contextlib.contextmanager
def atomic_directory(path):
    """``with atomic_directory(path) as tmp: <write files into tmp>``: the folder ``path`` appears,
    whole, at the end of the block, or stays as it was (a re-save of an existing ``path`` too).

    The files are written into ``path.tmp-PID`` and renamed over. A folder cannot be renamed over
    a non-empty one, so an existing ``path`` is first moved to ``path.old-PID``; a kill between the
    two renames leaves that whole old folder, which :func:`clean_orphans` puts back."""
    path = os.path.abspath(path)
    temporary, old = f"{path}.tmp-{os.getpid()}", f"{path}.old-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    try:
        yield temporary
        for name in os.listdir(temporary):
            _fsync(os.path.join(temporary, name))
        _fsync(temporary)
        if os.path.isdir(path):
            os.replace(path, old)
            os.replace(temporary, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, path)
        _fsync(os.path.dirname(path))
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _fsync(path):
    # a directory's own entry list must reach the disk too, or a rename can be lost in a power cut
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are durable without it
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process (or a platform that cannot tell): leave its files
    return True


def clean_orphans(directory):
    """Remove what a killed writer left in ``directory``: ``*.tmp-PID`` files and folders of
    processes no longer running (from :func:`atomic_write` and :func:`atomic_directory`); a
    ``NAME.old-PID`` folder goes back to ``NAME`` when the swap that moved it never finished.
    Returns the names it removed or restored."""
    touched = []
    for name in sorted(os.listdir(directory)):
        match = re.fullmatch(r"(.+)\.(tmp|old)-(\d+)", name)
        if match is None or _pid_alive(int(match.group(3))):
            continue
        full, original = os.path.join(directory, name), os.path.join(directory, match.group(1))
        if match.group(2) == "old" and not os.path.exists(original):
            os.replace(full, original)
        elif os.path.isdir(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(full)
        touched.append(name)
    return touched


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder, **extra):
    """Write ``folder/checksums.json``: the sha256 and size of every other file in ``folder``,
    plus ``extra`` (JSON values). Written last, it is what makes the folder complete."""
    files = {name: {"sha256": _sha256(os.path.join(folder, name)), "bytes": os.path.getsize(os.path.join(folder, name))}
             for name in sorted(os.listdir(folder)) if name != CHECKSUMS and os.path.isfile(os.path.join(folder, name))}
    with atomic_write(os.path.join(folder, CHECKSUMS), binary=False) as f:
        json.dump(dict(extra, files=files), f, indent=1, sort_keys=True)


def read_checksums(folder):
    """``folder/checksums.json`` as a dict, or a ValueError naming the file and what is wrong."""
    path = os.path.join(folder, CHECKSUMS)
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{folder} has no {CHECKSUMS}: it was not written whole (interrupted, or not a "
                         f"checkpoint)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is corrupt ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{path} is corrupt (no 'files' table)")
    return manifest


def verify_checksums(folder):
    """Check every file listed in ``folder/checksums.json`` against its size and sha256; returns
    the manifest, or raises ValueError naming the first file that is missing, truncated or altered."""
    manifest = read_checksums(folder)
    for name, expected in sorted(manifest["files"].items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing (listed in {CHECKSUMS})")
        size = os.path.getsize(path)
        if size != expected.get("bytes"):
            raise ValueError(f"{path} has {size} bytes, {expected.get('bytes')} were written: truncated or altered")
        if _sha256(path) != expected.get("sha256"):
            raise ValueError(f"{path} does not match its sha256 in {CHECKSUMS}: corrupt or altered")
    return manifest
