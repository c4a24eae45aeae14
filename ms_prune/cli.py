"""``ms-prune`` (or ``python -m ms_prune``): prune, train, evaluate and fetch models from the
command line. See docs/cli.md.

    ms-prune prune MODEL_DIR OUT_DIR --params 75% --data austen
    ms-prune train RECIPE.yaml [--resume]
    ms-prune eval MODEL_DIR --data wikitext2
    ms-prune fetch smollm2

MindSpore is imported only by the subcommand that needs it, so ``--help`` answers at once.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

__all__ = ["main", "run", "load_model", "build_parser", "HelpFormatter", "device_target_argument", "read_yaml"]

PROG = "ms-prune"

# config.json's model_type -> (zoo module, the classes an `architectures` entry may name; the
# first is taken when it names none of them)
ARCHITECTURES = {
    "llama": ("ms_prune.models.llama", ("LlamaForCausalLM", "LlamaModel")),
    "gpt2": ("ms_prune.models.gpt2", ("GPT2LMHeadModel", "GPT2Model")),
    "bert": ("ms_prune.models.bert", ("BertModel", "BertForSequenceClassification")),
}
CAUSAL_LMS = ("LlamaForCausalLM", "GPT2LMHeadModel")
CLASSIFIERS = ("BertForSequenceClassification",)
# what a pruned or trained folder keeps of its source folder beside the weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "generation_config.json")
METHODS = ("activation", "flap", "gradnas", "magnitude", "random")  # ms_prune.prune's, without importing it
SHAPE_OPTIONS = (("layers", "num_hidden_layers"), ("heads", "num_attention_heads"),
                 ("kv_heads", "num_key_value_heads"), ("ffn", "intermediate_size"), ("hidden_size", "hidden_size"))
MODES = ("graph", "pynative")


class UsageError(Exception):
    """A mistake in what the user asked for: printed as ``ms-prune CMD: error: ...``, no traceback."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and every option's default in its help (the samples' too)."""


def _progress(message):
    # stderr: stdout carries the result (the table; fetch's folder), for scripts to read
    print(f"[{PROG}] {message}", file=sys.stderr, flush=True)


def _quiet(message):
    del message


def _table(rows):
    """Two aligned columns."""
    width = max(len(str(k)) for k, _ in rows)
    return "\n".join(f"{str(k):<{width}}  {v}" for k, v in rows)


# ---- argument types: argparse names the option in the error ------------------------------------
def _budget(value):
    from ms_prune.validation import check_amount_or_percent
    text = value.strip()
    if not text.endswith("%"):
        try:
            number = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a percentage such as 75% or a positive number, got {value!r}")
        text = int(number) if number.is_integer() else number
    try:
        check_amount_or_percent("ms-prune", "the budget", text)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None
    return text


def _positive_int(value):
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _count(value):
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return number


def _model_dir(value):
    if not os.path.isfile(os.path.join(value, "config.json")):
        raise argparse.ArgumentTypeError(f"{value!r} is not a model folder (no config.json in it)")
    return value


def device_target_argument(value):
    """argparse ``type`` of a device target option: CPU, GPU or Ascend in any case, as MindSpore
    spells it (samples/harness.py's ``--device_target`` too)."""
    from ms_prune.training import device_target_name
    try:
        return device_target_name(value)
    except ValueError as err:  # argparse prints only this exception's message
        raise argparse.ArgumentTypeError(str(err)) from None


# ---- models ------------------------------------------------------------------------------------
def model_class(directory):
    """The zoo class for a Hugging Face-layout folder, read from its config.json (``model_type``,
    then ``architectures``): (class, whether the checkpoint was written for that class)."""
    import importlib
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as f:
        values = json.load(f)
    model_type = values.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UsageError(f"{path}: model_type {model_type!r} is not one ms_prune has ({', '.join(ARCHITECTURES)})")
    module, names = ARCHITECTURES[model_type]
    named = [a for a in values.get("architectures") or [] if a in names]
    return getattr(importlib.import_module(module), (named or names)[0]), bool(named or not values.get("architectures"))


def load_model(directory, progress=_progress):
    """The zoo model of a Hugging Face-layout folder (config.json + model.safetensors). A checkpoint
    of a class the zoo lacks (e.g. BertForMaskedLM) loads its backbone and reports the tensors it
    leaves."""
    cls, exact = model_class(directory)
    if not exact:
        progress(f"{directory}: ms_prune has no class its config.json's architectures names; loading it as "
                 f"{cls.__name__}")
    return cls.from_pretrained(directory, strict=exact)


def _max_positions(model):
    config = model.config
    return getattr(config, "n_positions", None) or (getattr(config, "max_position_embeddings", None)
                                                    if config.model_type != "llama" else None)


def _check_seq_len(model, seq_len, option="--seq-len"):
    limit = _max_positions(model)
    if limit is not None and seq_len > limit:
        raise UsageError(f"{option} {seq_len} is longer than the model's {limit} positions")


def _copy_tokenizer(source, target):
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), os.path.join(target, name))


def _tokenizer_dir(directory, what):
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise UsageError(f"{what} {directory!r} has no tokenizer.json to tokenize the data with")
    return directory


def _token_stream(tokenizer_dir, source, split, seq_len, progress, option="--data"):
    """One token stream of a data set's texts (joined by blank lines), long enough for a window
    of ``seq_len`` tokens and its next-token labels."""
    import numpy as np
    from ms_prune.data import read_dataset, token_encoder
    texts, _ = read_dataset(source, split)
    started = time.perf_counter()
    tokens = token_encoder(tokenizer_dir)("\n\n".join(texts))
    progress(f"{source} ({split}): {len(tokens):,} tokens ({time.perf_counter() - started:.1f} s to tokenize)")
    if len(tokens) < seq_len + 2:
        raise UsageError(f"{option} {source}: {len(tokens)} tokens, too few for one window of {seq_len} tokens "
                         f"and its labels; give more text or a shorter --seq-len")
    return np.asarray(tokens, np.int32)


def _labelled_rows(tokenizer_dir, source, split, seq_len, option="--data"):
    from ms_prune.data import read_dataset, token_rows
    texts, labels = read_dataset(source, split)
    if labels is None:
        raise UsageError(f"{option} {source}: a sequence classifier needs labelled texts (a TSV with a label "
                         f"column, a JSONL with \"label\", or sst2/agnews)")
    return token_rows(tokenizer_dir, texts, seq_len), labels


def _buckets(seq_len):
    # a few padded lengths: few compiled graphs, little padding
    return [b for b in (32, 64, 128, 256) if b < seq_len] + [seq_len]


def _set_context(args):
    from ms_prune.training import set_context
    set_context(args.mode, args.device_target, seed=getattr(args, "seed", None))


def _json_ready(value):
    import numpy as np
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_json(path, values):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_json_ready(values), f, indent=2, sort_keys=True)


# ---- prune -------------------------------------------------------------------------------------
def _constraints(parser, args):
    shape = {key: getattr(args, option) for option, key in SHAPE_OPTIONS if getattr(args, option) is not None}
    budgets = {k: getattr(args, k) for k in ("params", "flops") if getattr(args, k) is not None}
    if len(budgets) + bool(shape) != 1:
        parser.error("give one budget (--params or --flops) or a target shape (--layers, --heads, --kv-heads, "
                     f"--ffn, --hidden-size), got {'none' if not budgets and not shape else ', '.join(budgets) + ' and a shape'}")
    if args.depth and shape:
        parser.error("--depth meets a --params or --flops budget by removing layers; for a target depth give --layers")
    return budgets or shape


def _loaded(args):
    """(start time, the model of ``args.model_dir``, its class name), in the context ``args`` asks
    for, its positions checked against ``args.seq_len``."""
    _set_context(args)
    started = time.perf_counter()
    _progress(f"loading {args.model_dir}")
    model = load_model(args.model_dir)
    _check_seq_len(model, args.seq_len)
    return started, model, type(model).__name__


def prune_command(args, parser):
    constraints = _constraints(parser, args)
    from ms_prune.data import lm_batch_fn
    from ms_prune.structured import prune
    started, model, name = _loaded(args)
    needs_data = (args.method not in ("magnitude", "random") or args.refit or args.depth
                  or "num_hidden_layers" in constraints)
    calibration = loss_net = None
    if args.method == "gradnas" and name not in CAUSAL_LMS:
        raise UsageError(f"--method gradnas scores by a loss: the command has the language-model loss of "
                         f"{', '.join(CAUSAL_LMS)}; {args.model_dir} is a {name} (in Python: ms_prune.prune(model, "
                         f"..., method='gradnas', loss_net=YOUR_LOSS))")
    if needs_data:
        tokens = _token_stream(_tokenizer_dir(args.model_dir, "MODEL_DIR"), args.data, "train", args.seq_len, _progress)
        batch = lm_batch_fn(tokens, args.batch_size, args.seq_len, args.seed)
        count = math.ceil(args.samples / args.batch_size)
        calibration = [batch(i) if args.method == "gradnas" else batch(i)[:1] for i in range(count)]
        if args.method == "gradnas":
            from ms_prune.training import LMLoss
            loss_net = LMLoss(model)
        _progress(f"calibration: {count} batches of {args.batch_size} x {args.seq_len} tokens of {args.data}")
    units = ("layers",) if args.depth else ("heads", "neurons")
    _progress(f"pruning {name} to {constraints} by {'block influence' if args.depth else args.method}"
              f"{', uniform' if args.uniform else ''}{', with refit' if args.refit else ''}")
    report = prune(model, constraints, calibration, method=args.method, loss_net=loss_net, seq_len=args.seq_len,
                   uniform=args.uniform, units=units, refit=args.refit, seed=args.seed, verbose=False)
    os.makedirs(args.out_dir, exist_ok=True)
    model.save_pretrained(args.out_dir)
    _copy_tokenizer(args.model_dir, args.out_dir)
    written = [("pruned model (compact; ms_prune loads it)", args.out_dir)]
    try:
        config = model.standard_config()
    except (NotImplementedError, ValueError):
        config = None
    if config is not None:
        standard = os.path.join(args.out_dir, "standard")
        model.save_pretrained(standard, standard=True)
        _copy_tokenizer(args.model_dir, standard)
        written.append(("standard Hugging Face model of this shape", standard))
    if args.dense:
        dense = os.path.join(args.out_dir, "dense")
        model.export_hf_dense(dense)
        _copy_tokenizer(args.model_dir, dense)
        written.append(("dense Hugging Face model (removed units zeroed)", dense))
    report_path = os.path.join(args.out_dir, "prune_report.json")
    result = dict(report.to_dict(), model_dir=os.path.abspath(args.model_dir), architecture=name,
                  data=args.data if needs_data else None, samples=args.samples if needs_data else 0,
                  batch_size=args.batch_size, seed=args.seed, refit_requested=args.refit, depth=args.depth,
                  written={what: os.path.abspath(path) for what, path in written},
                  total_seconds=time.perf_counter() - started)
    _write_json(report_path, result)
    written.append(("report (JSON)", report_path))
    print(report.table())
    print(_table(written))
    return result


# ---- eval --------------------------------------------------------------------------------------
def eval_command(args, parser):
    del parser
    started, model, name = _loaded(args)
    tokenizer_dir = _tokenizer_dir(args.model_dir, "MODEL_DIR")
    max_batches = args.max_batches or None
    if name in CAUSAL_LMS:
        from ms_prune.training import lm_perplexity
        tokens = _token_stream(tokenizer_dir, args.data, args.split, args.seq_len, _progress)
        windows = (len(tokens) - 1) // args.seq_len
        used = min(windows // args.batch_size, max_batches or windows) * args.batch_size
        if used == 0:
            raise UsageError(f"--data {args.data}: {windows} windows of {args.seq_len} tokens, fewer than one "
                             f"--batch-size {args.batch_size}")
        _progress(f"perplexity on {used} windows of {args.seq_len} tokens")
        metric, value = "perplexity", lm_perplexity(model, tokens, args.batch_size, args.seq_len, max_batches)
        amount = f"{used} windows x {args.seq_len} tokens"
    elif name in CLASSIFIERS:
        from ms_prune.training import classification_accuracy
        rows, labels = _labelled_rows(tokenizer_dir, args.data, args.split, args.seq_len)
        if max_batches:
            rows, labels = rows[:max_batches * args.batch_size], labels[:max_batches * args.batch_size]
        _progress(f"accuracy on {len(rows)} texts")
        metric = "accuracy_percent"
        value = classification_accuracy(model, rows, labels, args.batch_size, _buckets(args.seq_len))
        amount = f"{len(rows)} texts"
    else:
        raise UsageError(f"eval measures perplexity of a causal LM ({', '.join(CAUSAL_LMS)}) or accuracy of a "
                         f"sequence classifier ({', '.join(CLASSIFIERS)}); {args.model_dir} is a {name}")
    result = {"model_dir": os.path.abspath(args.model_dir), "architecture": name, "data": args.data,
              "split": args.split, "metric": metric, "value": value, "evaluated": amount,
              "parameters": model.num_parameters(), "seconds": time.perf_counter() - started}
    print(_table([("model", args.model_dir), ("architecture", name), ("parameters", f"{result['parameters']:,}"),
                  ("data", f"{args.data} ({args.split}), {amount}"), (metric, f"{value:.4f}"),
                  ("seconds", f"{result['seconds']:.1f}")]))
    return result


# ---- train -------------------------------------------------------------------------------------
RECIPE_KEYS = ("model", "data", "trainer", "algorithms", "output")
DATA_DEFAULTS = {"train": None, "eval": None, "tokenizer": None, "seq_len": 128, "batch_size": 8, "eval_batches": 8}
ZOO_KEYS = ("type", "class", "config")
# Trainer arguments the command sets itself from the rest of the recipe
TRAINER_SET_HERE = ("model", "loss_fn", "train_data", "algorithms", "optimizer", "num_inputs", "eval_fn",
                    "checkpoint_dir", "resume_from", "logger", "no_decay")
GRADNAS_BATCHES = 8  # scoring batches a recipe's gradnas gets when it names no num_batches


def read_yaml(path, what):
    """What the YAML file ``path`` holds (None when empty); ``what`` ('recipe', 'config file')
    names it when it does not exist (FileNotFoundError). Malformed YAML is a ValueError."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None


def _read_recipe(path):
    recipe = read_yaml(path, "recipe")
    from ms_prune.validation import check_keys
    check_keys(path, recipe if recipe is not None else {}, RECIPE_KEYS, required=("model", "data", "trainer", "output"))
    return recipe


def _check_recipe(path, recipe):
    """The recipe checked at every depth (unknown keys name their full path): (model spec, data,
    trainer arguments, algorithms spec)."""
    import inspect
    from ms_prune.engine import Trainer
    from ms_prune.validation import check_instance, check_keys, check_like, check_ranges
    model = recipe["model"]
    if isinstance(model, dict):
        check_keys(path, model, ZOO_KEYS, required=("type", "config"), path="model")
        if model["type"] not in ARCHITECTURES:
            raise ValueError(f"{path}: model.type must be one of {list(ARCHITECTURES)}, got {model['type']!r}")
        classes = ARCHITECTURES[model["type"]][1]
        if model.get("class", classes[0]) not in classes:
            raise ValueError(f"{path}: model.class must be one of {list(classes)}, got {model['class']!r}")
        check_instance(path, "model.config", model["config"], dict)
    elif not isinstance(model, str):
        raise TypeError(f"{path}: model must be a model folder or a mapping {{type, class, config}}, "
                        f"got {type(model).__name__}")
    check_keys(path, recipe["data"], DATA_DEFAULTS, required=("train",), path="data")
    data = check_like(path, recipe["data"], DATA_DEFAULTS, path="data")
    for key in ("train", "eval", "tokenizer"):
        check_instance(path, f"data.{key}", data[key], str, allow_none=key != "train")
    check_ranges(path, {"data": data}, {"data.seq_len": (1, None), "data.batch_size": (1, None),
                                        "data.eval_batches": (0, None)})
    parameters = inspect.signature(Trainer.__init__).parameters
    defaults = {k: p.default for k, p in parameters.items()
                if k not in TRAINER_SET_HERE + ("self",) and p.default is not inspect.Parameter.empty}
    # the Trainer's defaults type its arguments (check_like makes '1e-4' a float); the Trainer checks ranges
    checked = check_like(path, recipe["trainer"], dict(defaults, max_steps=1), path="trainer")
    check_keys(path, recipe["trainer"], checked, required=("max_steps",), path="trainer")
    trainer = {k: checked[k] for k in recipe["trainer"]}
    if not isinstance(recipe["output"], str):
        raise TypeError(f"{path}: output must be a folder path, got {type(recipe['output']).__name__}")
    return model, data, trainer, recipe.get("algorithms")


def _recipe_model(path, spec, data):
    """(model, tokenizer folder) of the recipe's ``model`` and ``data.tokenizer``."""
    if isinstance(spec, str):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise UsageError(f"{path}: model {spec!r} is not a model folder (no config.json in it)")
        return load_model(spec), _tokenizer_dir(data["tokenizer"] or spec, "data.tokenizer" if data["tokenizer"]
                                                else "model")
    import importlib
    module, classes = ARCHITECTURES[spec["type"]]
    module = importlib.import_module(module)
    cls = getattr(module, spec.get("class", classes[0]))
    from ms_prune.validation import check_keys
    check_keys(path, spec["config"], cls.config_class.defaults, path="model.config")
    config = cls.config_class(**spec["config"])  # it checks the values
    if data["tokenizer"] is None:
        raise UsageError(f"{path}: a model built from model.config needs data.tokenizer, a folder holding "
                         f"tokenizer.json")
    return cls(config), _tokenizer_dir(data["tokenizer"], "data.tokenizer")


def train_command(args, parser):
    del parser
    from ms_prune.training import set_context, under_msrun
    recipe = _read_recipe(args.recipe)
    spec, data, trainer_args, algorithm_spec = _check_recipe(args.recipe, recipe)
    set_context(args.mode, args.device_target, seed=trainer_args.get("seed", 0))
    rank, workers = 0, 1
    if under_msrun():
        from mindspore.communication import get_group_size, get_rank, init
        init()
        rank, workers = get_rank(), get_group_size()
    say = _progress if rank == 0 else _quiet
    output = recipe["output"]
    checkpoints = os.path.join(output, "checkpoints")
    has_checkpoints = os.path.isfile(os.path.join(checkpoints, "latest"))
    if has_checkpoints and not args.resume:
        raise UsageError(f"{checkpoints} holds a run's checkpoints: --resume continues it; or set another output")
    from ms_prune.engine import Trainer
    from ms_prune.engine.recipes import build_algorithms, canonical_name
    model, tokenizer_dir = _recipe_model(args.recipe, spec, data)
    name = type(model).__name__
    _check_seq_len(model, data["seq_len"], "data.seq_len")
    seed, seq_len, batch_size = trainer_args.get("seed", 0), data["seq_len"], data["batch_size"]
    if name in CAUSAL_LMS:
        from ms_prune.data import lm_batch_fn
        from ms_prune.training import lm_cross_entropy, lm_perplexity
        train_data = lm_batch_fn(_token_stream(tokenizer_dir, data["train"], "train", seq_len, say, "data.train"),
                                 batch_size, seq_len, seed)
        loss_fn, num_inputs, metric = lm_cross_entropy, 1, "perplexity"
        if data["eval"]:
            eval_tokens = _token_stream(tokenizer_dir, data["eval"], "test", seq_len, say, "data.eval")
            eval_fn = lambda m: {metric: lm_perplexity(m, eval_tokens, batch_size, seq_len,  # noqa: E731
                                                       data["eval_batches"] or None)}
    elif name in CLASSIFIERS:
        from ms_prune.data import row_batch_fn
        from ms_prune.training import classification_accuracy
        rows, labels = _labelled_rows(tokenizer_dir, data["train"], "train", seq_len, "data.train")
        train_data = row_batch_fn(rows, labels, batch_size, _buckets(seq_len), seed)
        from mindspore import ops
        loss_fn, num_inputs, metric = ops.cross_entropy, 2, "accuracy_percent"
        if data["eval"]:
            eval_rows, eval_labels = _labelled_rows(tokenizer_dir, data["eval"], "test", seq_len, "data.eval")
            if data["eval_batches"]:
                eval_rows, eval_labels = (eval_rows[:data["eval_batches"] * batch_size],
                                          eval_labels[:data["eval_batches"] * batch_size])
            eval_fn = lambda m: {metric: classification_accuracy(m, eval_rows, eval_labels,  # noqa: E731
                                                                 batch_size, _buckets(seq_len))}
    else:
        raise UsageError(f"train trains a causal LM ({', '.join(CAUSAL_LMS)}) or a sequence classifier "
                         f"({', '.join(CLASSIFIERS)}); the recipe's model is a {name}")
    if not data["eval"]:
        eval_fn = None
    extra = {}
    if any(canonical_name(key) == "gradnas" for key in algorithm_spec or {}):
        arguments = next(v for k, v in algorithm_spec.items() if canonical_name(k) == "gradnas") or {}
        extra["gradnas"] = {"batches": [train_data(i) for i in range(arguments.get("num_batches") or GRADNAS_BATCHES)]}
    algorithms = build_algorithms(algorithm_spec, **extra)
    resume = "latest" if has_checkpoints else None
    say(f"{'resuming' if resume else 'training'} {name} ({model.num_parameters():,} parameters) for "
        f"{trainer_args['max_steps']} steps of {batch_size} x {seq_len} tokens of {data['train']} on {workers} "
        f"worker(s){'; algorithms ' + ', '.join(type(a).__name__ for a in algorithms) if algorithms else ''}")
    trainer = Trainer(model, loss_fn, train_data, algorithms=algorithms, num_inputs=num_inputs, eval_fn=eval_fn,
                      checkpoint_dir=checkpoints, resume_from=resume, **trainer_args)
    history = trainer.fit()
    result = {"recipe": os.path.abspath(args.recipe), "architecture": name, "workers": workers,
              "history": history, "summary": trainer.summary, "parameters": model.num_parameters(),
              "heads_per_layer": model.heads_per_layer(), "model": os.path.abspath(os.path.join(output, "model"))}
    if rank == 0:
        model.save_pretrained(result["model"])
        _copy_tokenizer(tokenizer_dir, result["model"])
        _write_json(os.path.join(output, "train_report.json"), result)
        last = history[-1] if history else {}
        rows = [("model", result["model"]), ("architecture", name), ("parameters", f"{result['parameters']:,}"),
                ("heads per layer", result["heads_per_layer"]), ("step", trainer.state.step)]
        if "loss" in last:
            rows.append(("last loss", f"{last['loss']:.4f}"))
        if metric in last:
            rows.append((metric, f"{last[metric]:.4f}"))
        rows += [("seconds", f"{trainer.summary['seconds']:.1f}"),
                 ("report", os.path.join(output, "train_report.json"))]
        print(_table(rows))
    return result


# ---- fetch -------------------------------------------------------------------------------------
def fetch_command(args, parser):
    del parser
    from ms_prune.hub import MODELS
    _progress(f"locating {args.model} (fetched into the cache the first time)")
    try:
        directory = MODELS[args.model](args.cache_dir)
    except RuntimeError as err:
        raise UsageError(str(err)) from None
    print(directory)
    return {"model": args.model, "directory": directory}


# ---- the parser --------------------------------------------------------------------------------
def _context_options(parser):
    parser.add_argument("--mode", default="graph", choices=MODES,
                        help="MindSpore execution mode: graph (GRAPH_MODE) or pynative")
    parser.add_argument("--device-target", default="CPU", type=device_target_argument,
                        help="CPU, GPU or Ascend (any case)")


def build_parser():
    from ms_prune import __version__
    parser = argparse.ArgumentParser(prog=PROG, formatter_class=HelpFormatter,
                                     description="Prune, train and evaluate MindSpore transformers (BERT, GPT-2, "
                                                 "Llama) in Hugging Face folders. See docs/cli.md.")
    parser.add_argument("--version", action="version", version=f"ms_prune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("prune", formatter_class=HelpFormatter, help="prune heads, FFN neurons or layers",
                            description="Prune a model's attention heads (by key/value group) and FFN neurons, or "
                                        "its layers, to a budget or a target shape with ms_prune.prune; write the "
                                        "pruned model and a JSON report into OUT_DIR and print the report's table.")
    p.add_argument("model_dir", metavar="MODEL_DIR", type=_model_dir,
                   help="a Hugging Face-layout BERT, GPT-2 or Llama folder (config.json, model.safetensors, "
                        "tokenizer.json for calibration)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where the pruned model and prune_report.json go")
    p.add_argument("--method", default="activation", choices=METHODS,
                   help="what ranks heads and neurons: activation (Minitron), flap, gradnas (loss gradients; "
                        "causal LMs), magnitude or random (no data)")
    budget = p.add_argument_group("budget (one of them) or target shape (any of --layers, --heads, --kv-heads, --ffn, "
                                   "--hidden-size)")
    budget.add_argument("--params", type=_budget, help="parameters to keep: a percentage such as 75%% or a number")
    budget.add_argument("--flops", type=_budget, help="FLOPs of one --seq-len sequence to keep: 60%% or a number")
    for option, key in SHAPE_OPTIONS:
        budget.add_argument(f"--{option.replace('_', '-')}", dest=option, type=_positive_int, help=f"target {key}")
    p.add_argument("--uniform", action="store_true",
                   help="the same heads and FFN width in every layer (a Llama is then also written as a standard "
                        "Hugging Face model, OUT_DIR/standard)")
    p.add_argument("--depth", action="store_true", help="meet the budget by removing whole layers (block influence)")
    p.add_argument("--refit", action="store_true",
                   help="rescale the kept units by least squares to reconstruct each layer's output")
    p.add_argument("--dense", action="store_true",
                   help="also write OUT_DIR/dense: the unpruned shapes with removed units zeroed (any transformers)")
    p.add_argument("--data", default="austen",
                   help="calibration text: austen, tinyshakespeare, wikitext2 (valid), sst2, agnews (train), or a "
                        ".txt, .tsv (text column) or .jsonl (\"text\") file")
    p.add_argument("--samples", default=32, type=_positive_int, help="calibration sequences")
    p.add_argument("--seq-len", default=256, type=_positive_int,
                   help="tokens per calibration sequence (and the sequence the FLOPs are counted on)")
    p.add_argument("--batch-size", default=4, type=_positive_int, help="calibration sequences per batch")
    p.add_argument("--seed", default=0, type=_count, help="seed of the calibration windows and of random scores")
    _context_options(p)
    p.set_defaults(handler=prune_command)

    p = commands.add_parser("train", formatter_class=HelpFormatter, help="train from a YAML recipe",
                            description="Train a model with the algorithms of a YAML recipe (model, data, trainer, "
                                        "algorithms, output; see docs/cli.md). Checkpoints go to OUTPUT/checkpoints, "
                                        "the trained model to OUTPUT/model. Under msrun each worker joins the "
                                        "data-parallel group.")
    p.add_argument("recipe", metavar="RECIPE.yaml", help="the recipe")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT/checkpoints")
    _context_options(p)
    p.set_defaults(handler=train_command)

    p = commands.add_parser("eval", formatter_class=HelpFormatter, help="perplexity or accuracy of a model",
                            description="Perplexity of a causal LM (consecutive windows of --seq-len tokens) or "
                                        "accuracy of a sequence classifier, on a data set's evaluation split.")
    p.add_argument("model_dir", metavar="MODEL_DIR", type=_model_dir, help="a Hugging Face-layout folder")
    p.add_argument("--data", default="wikitext2",
                   help="wikitext2, tinyshakespeare, sst2, agnews, austen, or a .txt, .tsv or .jsonl file")
    p.add_argument("--split", default="test", choices=("test", "train"),
                   help="test: the named set's evaluation split (WikiText-2 test, the SST-2 GLUE dev set, ...)")
    p.add_argument("--seq-len", default=256, type=_positive_int, help="tokens per window (classifiers: at most)")
    p.add_argument("--batch-size", default=1, type=_positive_int, help="windows or texts per batch")
    p.add_argument("--max-batches", default=0, type=_count, help="evaluate at most this many batches (0: all)")
    _context_options(p)
    p.set_defaults(handler=eval_command)

    p = commands.add_parser("fetch", formatter_class=HelpFormatter, help="fetch a pretrained model",
                            description="Print the local folder of a pretrained model, fetching it into the cache "
                                        "first if needed (ms_prune.hub).")
    p.add_argument("model", choices=("minilm", "smollm2"),
                   help="minilm: all-MiniLM-L6-v2 (BERT); smollm2: SmolLM2-135M-Instruct (Llama)")
    p.add_argument("--cache-dir", default=None, help="cache folder (None: $MS_PRUNE_CACHE or ~/.cache/ms_prune)")
    p.set_defaults(handler=fetch_command)
    return parser


def run(argv=None):
    """Run a command; returns its result (a dict). Errors raise (``UsageError`` for mistakes in what
    was asked); argparse exits on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args, parser)


def main(argv=None):
    """The console script: 0 on success, 1 after an error (printed without traceback unless
    --debug), 2 for bad arguments (argparse)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(argv)
    except (UsageError, ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        if "--debug" in argv:
            raise
        command = next((a for a in argv if a in ("prune", "train", "eval", "fetch")), "")
        print(f"{PROG} {command}: error: {err}".replace("  ", " "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
