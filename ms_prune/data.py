"""Readers for the evaluation data the samples, benchmarks and tests use.

The data lives outside the repository. Where it is found, first match wins: the ``data_dir=``
argument of a reader; ``$MS_PRUNE_DATA``; ``../shared/data`` beside the source checkout; and
``../shared/data`` beside the working directory. A folder named by the argument or the
variable must exist (an error names it; there is no silent fallback), and an installed ms_prune,
which has no checkout around it, finds the data through either of them from any directory.
"""
import csv
import os

import numpy as np

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_VAR = "MS_PRUNE_DATA"
_CONTENTS = "sst2/, tinyshakespeare.txt and gpt2-bpe/"


def _find_data_dir(explicit=None):
    named = [("data_dir", explicit), (ENV_VAR, os.environ.get(ENV_VAR) or None)]
    for source, path in named:
        if path is not None:
            if not os.path.isdir(path):
                raise FileNotFoundError(f"{source}={path!r} is not a folder (resolved to {os.path.abspath(path)}); "
                                        f"point it at the data folder holding {_CONTENTS}")
            return os.path.abspath(path)
    candidates = [os.path.join(os.getcwd(), "..", "shared", "data")]
    if os.path.isfile(os.path.join(_REPO_ROOT, "setup.py")):  # a source checkout, not site-packages
        candidates.insert(0, os.path.join(_REPO_ROOT, "..", "shared", "data"))
    for path in candidates:
        if os.path.isdir(path):
            return os.path.abspath(path)
    raise FileNotFoundError(f"no data folder found: set {ENV_VAR}=/path/to/data (the folder holding {_CONTENTS}) "
                            f"or pass data_dir=... to the reader; looked in "
                            f"{[os.path.abspath(p) for p in candidates]}")


def data_dir(path=None):
    """The data folder: ``path``, else ``$MS_PRUNE_DATA``, else ``../shared/data`` beside the checkout
    or the working directory (see the module docstring). FileNotFoundError names what is missing."""
    return _find_data_dir(path)


def data_path(*parts, data_dir=None):
    """A file or folder inside the data folder (``data_dir`` as for :func:`data_dir`)."""
    root = _find_data_dir(data_dir)
    path = os.path.join(root, *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist (data folder {root})")
    return path


def read_sst2(split, data_dir=None):
    """SST-2 as (sentences, labels); split is 'train', 'dev' or 'test' (the GLUE dev set)."""
    if split not in ("train", "dev", "test"):
        raise ValueError(f"SST-2 split must be 'train', 'dev' or 'test', got {split!r}")
    sentences, labels = [], []
    with open(data_path("sst2", f"{split}.tsv", data_dir=data_dir), encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        for row in reader:
            sentences.append(row[0].strip())
            labels.append(int(row[1]))
    return sentences, np.asarray(labels, np.int32)


def token_encoder(model_dir):
    """``text -> numpy int32 token ids`` with the tokenizer (``tokenizer.json``, the ``tokenizers``
    package) of a Hugging Face-layout model folder."""
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))

    def encode(text):
        return np.asarray(tokenizer.encode(text).ids, np.int32)
    encode.tokenizer = tokenizer
    return encode


AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")


def read_austen(data_dir=None):
    """Jane Austen's six novels as one string (general English prose for calibration and
    distillation; disjoint from WikiText-2, which stays for evaluation)."""
    texts = []
    for novel in AUSTEN_NOVELS:
        with open(data_path("austen", novel + ".txt", data_dir=data_dir), encoding="utf-8") as f:
            texts.append(f.read())
    return "\n\n".join(texts)


def read_wikitext2(split, data_dir=None):
    """WikiText-2 (the tokenised release: ``<unk>``, `` @-@ ``) as one string; split is 'valid'
    or 'test' (evaluation only: the training split is not in the shared data)."""
    if split not in ("valid", "test"):
        raise ValueError(f"WikiText-2 split must be 'valid' or 'test', got {split!r}")
    with open(data_path("wikitext2", f"{split}.txt", data_dir=data_dir), encoding="utf-8") as f:
        return f.read()


def gpt2_tokenizer(data_dir=None):
    """The original GPT-2 byte-level BPE (``tokenizers`` library) from the shared files."""
    from tokenizers import ByteLevelBPETokenizer
    return ByteLevelBPETokenizer.from_file(data_path("gpt2-bpe", "encoder.json", data_dir=data_dir),
                                           data_path("gpt2-bpe", "vocab.bpe", data_dir=data_dir))


def shakespeare_tokens(val_fraction=0.1, data_dir=None):
    """tiny Shakespeare as GPT-2 token ids: (train, val), the usual first-90%/last-10% split."""
    with open(data_path("tinyshakespeare.txt", data_dir=data_dir), encoding="utf-8") as f:
        text = f.read()
    split = int(len(text) * (1 - val_fraction))
    tokenizer = gpt2_tokenizer(data_dir)
    encode = lambda t: np.asarray(tokenizer.encode(t).ids, np.int32)
    return encode(text[:split]), encode(text[split:])


def shakespeare_chars(val_fraction=0.1, data_dir=None):
    """tiny Shakespeare as character ids (nanoGPT's char-level setting): (train, val), the
    characters (id i is ``chars[i]``). With 65 symbols the embedding and LM head are negligible,
    so a small model's cost is its transformer layers, as in a large model."""
    with open(data_path("tinyshakespeare.txt", data_dir=data_dir), encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((lookup[c] for c in text), np.int32, len(text))
    split = int(len(text) * (1 - val_fraction))
    return (ids[:split], ids[split:]), chars


def lm_batches(tokens, batch_size, seq_len, rng):
    """Endless random (input_ids, labels) windows of a token stream, labels shifted by one."""
    while True:
        starts = rng.integers(0, len(tokens) - seq_len - 1, batch_size)
        window = np.stack([tokens[s:s + seq_len + 1] for s in starts])
        yield window[:, :-1], window[:, 1:]


def lm_batch_fn(tokens, batch_size, seq_len, seed):
    """A function ``step -> (input_ids, labels)`` of random windows drawn from ``(seed, step)``:
    any step's batch can be had again, so a resumed run sees what the uninterrupted run saw."""
    def batch(step):
        starts = np.random.default_rng((seed, step)).integers(0, len(tokens) - seq_len - 1, batch_size)
        window = np.stack([tokens[s:s + seq_len + 1] for s in starts])
        return window[:, :-1], window[:, 1:]
    return batch


def lm_eval_windows(tokens, batch_size, seq_len, max_batches=None):
    """Consecutive non-overlapping (input_ids, labels) windows for perplexity."""
    count = (len(tokens) - 1) // seq_len
    windows = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(count)])
    for b, start in enumerate(range(0, count - batch_size + 1, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        chunk = windows[start:start + batch_size]
        yield chunk[:, :-1], chunk[:, 1:]


def compact_vocabulary(*streams):
    """Re-number token ids to 0..V-1 over the ids the streams use: (new streams, V). A small
    model trained on one corpus then does not pay for the 50k-row GPT-2 embedding and LM head."""
    used = np.unique(np.concatenate(streams))
    lookup = np.zeros(int(used.max()) + 1, np.int32)
    lookup[used] = np.arange(len(used), dtype=np.int32)
    return [lookup[s] for s in streams], len(used)


def token_rows(model_dir, texts, max_len):
    """Each text as one row of token ids (a list), with the tokenizer of a Hugging Face-layout
    model folder, unpadded and truncated to ``max_len`` tokens (special tokens kept)."""
    tokenizer = token_encoder(model_dir).tokenizer
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_len)
    return [e.ids for e in tokenizer.encode_batch(list(texts))]


def pad_rows(rows, buckets):
    """(ids, attention mask) of ``rows`` padded with 0 to the smallest of ``buckets`` that holds
    the longest: a few lengths, so GRAPH_MODE compiles a few graphs rather than one per length."""
    length = min(b for b in buckets if b >= max(len(r) for r in rows))
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


def row_batch_fn(rows, labels, batch_size, buckets, seed):
    """A function step -> (ids, mask, labels), a random batch drawn from one length bucket (so
    most batches are short), the same for a step every time (a resumed run sees what the
    uninterrupted run saw)."""
    lengths = np.array([len(r) for r in rows])
    pools = [np.flatnonzero((lengths <= b) & (lengths > lo)) for lo, b in zip([0] + list(buckets[:-1]), buckets)]
    pools = [p for p in pools if len(p)]
    weights = np.array([len(p) for p in pools], np.float64) / len(rows)

    def batch(step):
        rng = np.random.default_rng((seed, step))
        pool = pools[rng.choice(len(pools), p=weights)]
        pick = pool[rng.integers(0, len(pool), batch_size)]
        ids, mask = pad_rows([rows[i] for i in pick], buckets)
        return ids, mask, labels[pick]
    return batch


def _split_text(text, split, val_fraction=0.1):
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut] if split == "train" else text[cut:]


def _read_text(name, data_dir=None):
    with open(data_path(name, data_dir=data_dir), encoding="utf-8") as f:
        return f.read()


# name -> split ("train": training and calibration, "test": evaluation) -> (texts, labels or None)
DATASETS = {
    "austen": {"train": lambda d: ([read_austen(d)], None)},
    "tinyshakespeare": {s: (lambda d, s=s: ([_split_text(_read_text("tinyshakespeare.txt", d), s)], None))
                        for s in ("train", "test")},
    "wikitext2": {"train": lambda d: ([read_wikitext2("valid", d)], None),
                  "test": lambda d: ([read_wikitext2("test", d)], None)},
    "sst2": {"train": lambda d: read_sst2("train", d), "test": lambda d: read_sst2("test", d)},
    "agnews": {"train": lambda d: read_table(data_path("agnews", "dev.tsv", data_dir=d)),
               "test": lambda d: read_table(data_path("agnews", "test.tsv", data_dir=d))},
}
TEXT_COLUMNS = ("text", "sentence")


def _is_int(value):
    try:
        int(value)
        return True
    except (TypeError, ValueError):
        return False


def read_table(path):
    """A TSV file of texts, or a JSONL file of objects with a "text" field: (texts, labels or
    None). TSV: a header row (a column named text or sentence, and label) or none (the text in
    the first column, an integer label in the last when every row has one)."""
    import json
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f"{path}:{number}: each line must be a JSON object with a \"text\" string")
                texts.append(row["text"])
                labels.append(row.get("label"))
        else:
            rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
            header = rows and not _is_int(rows[0][-1])
            names = [c.strip().lower() for c in rows[0]] if header else []
            text = next((names.index(c) for c in TEXT_COLUMNS if c in names), 0)
            label = names.index("label") if "label" in names else (None if header or len(rows[0]) < 2 else -1)
            for row in rows[1:] if header else rows:
                texts.append(row[text].strip())
                labels.append(row[label] if label is not None and len(row) > 1 else None)
    if not texts:
        raise ValueError(f"{path} holds no texts")
    if any(label is None or not _is_int(label) for label in labels):
        return texts, None
    return texts, np.asarray([int(label) for label in labels], np.int32)


def read_dataset(source, split="train", data_dir=None):
    """(texts, labels or None) of a named data set (``DATASETS``: austen, tinyshakespeare,
    wikitext2, sst2, agnews) or a file (.txt: one text; .tsv or .jsonl: ``read_table``).
    ``split``: 'train' (training and calibration) or 'test' (evaluation); a named set keeps them
    apart (WikiText-2 trains on valid and evaluates on test, tiny Shakespeare its first 90% and
    last 10%); a file is the same for both."""
    if split not in ("train", "test"):
        raise ValueError(f"read_dataset: split must be 'train' or 'test', got {split!r}")
    if source in DATASETS:
        if split not in DATASETS[source]:
            raise ValueError(f"{source} has no {split!r} split (it has {sorted(DATASETS[source])}): "
                             f"evaluate on another data set")
        return DATASETS[source][split](data_dir)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source!r} is neither a named data set ({', '.join(sorted(DATASETS))}) nor a file")
    if source.endswith((".tsv", ".jsonl")):
        return read_table(source)
    with open(source, encoding="utf-8") as f:
        return [f.read()], None
