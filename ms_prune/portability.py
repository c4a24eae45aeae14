"""Which primitives a compiled GRAPH_MODE step uses, and where MindSpore documents them for which
backends: what "runs on Ascend and GPU" rests on until a run there is possible.

* :func:`graph_primitives` runs a function in a fresh Python process with MindSpore's IR dump on
  (``MS_DEV_SAVE_GRAPHS=1``, ``MS_DEV_SAVE_GRAPHS_PATH``; measured on 2.10: setting them in a
  running process dumps nothing, and the in-process ``set_context(save_graphs=...)`` works but is
  deprecated; a fresh process also compiles every graph afresh instead of reusing one cached by an
  earlier call) and reads two files per compiled graph:

  - ``<n>_execute_<k>.ir``: the frontend's final graph, the one every backend is handed (on
    Ascend or GPU the same graph goes to their kernel selection; the CPU backend then rewrites
    some of its nodes, e.g. ``SumExt`` into ``ReduceSum`` and ``Muls`` into ``Mul``);
  - ``graph_build_<g>_<k>.ir``: each kernel graph as the CPU backend built it (the kernels that
    ran here).

  Every node of those graphs that calls a primitive is kept, framework-internal ones
  (``MakeTuple``, ``Depend``, ``UpdateState``, ``Return``...) included: which of them need no
  kernel is said, with the evidence, in the reviewed allow-list, not assumed here. Calls of
  sub-graphs (``@name(...)``, ``%3(...)``) are not primitives and are skipped.

* :func:`documented_platforms` reads MindSpore's own "Supported Platforms:" of a primitive, in
  this order, and :func:`documentation` also says where it found it:

  1. the primitive class (``mindspore.ops.<Name>``, else the generated
     ``mindspore.ops.auto_generate.gen_ops_prim.<Name>``, else ``mindspore.ops.operations``'s
     grad and inner ops);
  2. the functional op that class's docstring links ("Refer to :func:`mindspore.ops.sum_ext`",
     resolved in ``mindspore.ops``, then ``mindspore.ops.auto_generate`` where the generated
     functional ops live);
  3. :data:`FUNCTIONAL_OP`, an explicit table for primitives whose link is missing or leads to an
     undocumented function (each entry says why it is the right op);
  4. the CamelCase name in snake_case (``BiasAdd`` -> ``bias_add``) in ``mindspore.ops``, then
     ``mindspore.mint``.

  Nothing fuzzy: a name that none of these finds is undocumented (None).

Not covered: eagerly run ops (PyNative, or ``ops.assign`` of a host value between steps: they are
in no IR dump), and kernels a backend substitutes on its own (only the CPU's are seen here).
"""
import importlib
import os
import pickle
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

__all__ = ["graph_primitives", "GraphPrimitives", "documented_platforms", "documentation",
           "FUNCTIONAL_OP", "PLATFORMS"]

PLATFORMS = ("Ascend", "GPU", "CPU")

# The frontend's last pipeline action ("execute") and the kernel graphs the backend built.
FRONTEND_FILE = re.compile(r"^\d+_execute_\d+\.ir$")
KERNEL_FILE = re.compile(r"^graph_build_\d+_\d+\.ir$")
# "  %3(CNode_12) = PrimFunc_MatMul(%1, %2) ..." or "  Return(%5)"; sub-graph calls start with @ or %
NODE = re.compile(r"^  (?:%\S+ = )?(?:PrimFunc_)?([A-Za-z_]\w*)\(")
SOURCE = re.compile(r"^\s+# In file (.+?):(\d+)")

# primitive -> the public functional op documenting it, where steps 1-2 find no platforms (none
# is needed for the graphs of the current algorithms; an entry must say why its op is the right one).
FUNCTIONAL_OP = {}

_CHILD = """
import pickle, sys
fn, args, kwargs = pickle.loads(sys.stdin.buffer.read())
import mindspore as ms
ms.set_context(mode=ms.GRAPH_MODE)
fn(*args, **kwargs)
"""


@dataclass
class GraphPrimitives:
    """Primitive name -> set of source locations ("file:line", the innermost outside MindSpore
    that the IR names) in the frontend graphs and in the CPU kernel graphs; ``files``: the dump
    files read (one frontend file per compiled graph, one per kernel graph)."""
    frontend: dict = field(default_factory=dict)
    kernel: dict = field(default_factory=dict)
    files: list = field(default_factory=list)

    @property
    def names(self):
        return set(self.frontend) | set(self.kernel)

    def origins(self, name):
        return sorted(self.frontend.get(name, set()) | self.kernel.get(name, set()))


def _origin(comments):
    """The innermost source line outside the mindspore package (the IR lists the call chain
    outermost first), else the innermost one."""
    outside = [site for site in comments if f"{os.sep}mindspore{os.sep}" not in site[0]]
    if not (outside or comments):
        return None
    path, line = (outside or comments)[-1]
    try:
        path = os.path.relpath(path)
    except ValueError:
        pass
    return f"{path}:{line}"


def parse_ir(path):
    """{primitive: set of origins} of one dumped ``.ir`` file."""
    found, name, comments = {}, None, []

    def flush():
        if name is not None:
            origin = _origin(comments)
            found.setdefault(name, set()).update([origin] if origin else [])

    with open(path, encoding="utf-8", errors="replace") as f:
        for text in f:
            node = NODE.match(text)
            if node:
                flush()
                name, comments = node.group(1), []
                continue
            source = SOURCE.match(text)
            if source and name is not None:
                comments.append((source.group(1), source.group(2)))
            elif text.startswith("}") or text.startswith("subgraph") or text.startswith("#"):
                flush()
                name, comments = None, []
    flush()
    return found


def read_ir_dump(folder):
    """A :class:`GraphPrimitives` of every frontend and kernel graph dumped under ``folder``."""
    result = GraphPrimitives()
    for root, _, files in os.walk(folder):
        for filename in files:
            target = (result.frontend if FRONTEND_FILE.match(filename)
                      else result.kernel if KERNEL_FILE.match(filename) else None)
            if target is None:
                continue
            result.files.append(filename)
            for name, origins in parse_ir(os.path.join(root, filename)).items():
                target.setdefault(name, set()).update(origins)
    if not result.frontend and not result.kernel:
        raise RuntimeError(f"graph_primitives: no graph was dumped in {folder}: did the function run a "
                           f"GRAPH_MODE (or ms.jit) graph?")
    # one kind without the other means MindSpore renamed its dump files: fail rather than check half
    if not result.frontend or not result.kernel:
        raise RuntimeError(f"graph_primitives: found {'no' if not result.frontend else 'some'} frontend graph "
                           f"({FRONTEND_FILE.pattern}) and {'no' if not result.kernel else 'some'} kernel graph "
                           f"({KERNEL_FILE.pattern}) files in {folder}: has MindSpore renamed its IR dumps?")
    return result


def graph_primitives(fn, *args, timeout=600, **kwargs):
    """Run ``fn(*args, **kwargs)`` in a new Python process (GRAPH_MODE set first, IR dump on) and
    return the :class:`GraphPrimitives` of every graph it compiled.

    ``fn`` must be picklable by reference (a module-level function of an importable module; the
    child gets this process's ``sys.path``), its arguments picklable. Raises RuntimeError with
    the child's output when it fails."""
    try:
        payload = pickle.dumps((fn, args, kwargs))
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise TypeError(f"graph_primitives: fn must be a module-level function with picklable arguments, "
                        f"got {fn!r} ({error})") from None
    with tempfile.TemporaryDirectory(prefix="ms_prune_ir_") as folder:
        env = dict(os.environ, MS_DEV_SAVE_GRAPHS="1", MS_DEV_SAVE_GRAPHS_PATH=folder,
                   PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        done = subprocess.run([sys.executable, "-c", _CHILD], input=payload, env=env, capture_output=True,
                              timeout=timeout, check=False)
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode("utf-8", "replace").splitlines()
            output = [line for line in output if "[WARNING]" not in line]
            raise RuntimeError(f"graph_primitives: {fn.__module__}.{fn.__qualname__} failed (exit "
                               f"{done.returncode}):\n" + "\n".join(output[-40:]))
        return read_ir_dump(folder)


# ---- documentation ---------------------------------------------------------------------------
SUPPORTED = re.compile(r"Supported Platforms:[ \t]*\n\s*(\S[^\n]*)")
REFER = re.compile(r"Refer to :func:`([\w.]+)`")


def _platforms(obj):
    """(frozenset of the ``Platform`` names, the section's text), or None without the section."""
    match = SUPPORTED.search(getattr(obj, "__doc__", None) or "")
    if not match:
        return None
    return frozenset(re.findall(r"``(\w+)``", match.group(1))), match.group(1).strip()


def _resolve(dotted):
    """A dotted ``mindspore...`` name as an object, or None; ``mindspore.ops.x`` is also looked
    up in ``mindspore.ops.auto_generate`` (where MindSpore's docs' generated ``ops.x`` live)."""
    module, _, attr = dotted.rpartition(".")
    candidates = [module] + (["mindspore.ops.auto_generate"] if module == "mindspore.ops" else [])
    for candidate in candidates:
        try:
            found = getattr(importlib.import_module(candidate), attr, None)
        except ImportError:
            found = None
        if found is not None:
            return found
    return None


def snake_case(name):
    """``BiasAddGrad`` -> ``bias_add_grad``, ``GatherDGradV2`` -> ``gather_d_grad_v2``."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def _primitive_class(name):
    for module in ("mindspore.ops", "mindspore.ops.auto_generate.gen_ops_prim", "mindspore.ops.operations",
                   "mindspore.ops.operations._grad_ops", "mindspore.ops.operations._inner_ops"):
        found = getattr(importlib.import_module(module), name, None)
        if isinstance(found, type):
            return f"{module}.{name}", found
    return None, None


def documentation(name):
    """``(platforms, where)``: the frozenset of platforms MindSpore documents for primitive
    ``name`` and the dotted name of the docstring that says so, or ``(None, None)``. A section
    naming no platform (``Deprecated``) gives an empty set, its text quoted in ``where``."""
    where, cls = _primitive_class(name)
    steps = []
    if cls is not None:
        steps.append((where, cls))
        link = REFER.search(cls.__doc__ or "")
        if link:
            steps.append((link.group(1), _resolve(link.group(1))))
    if name in FUNCTIONAL_OP:
        steps.append((FUNCTIONAL_OP[name], _resolve(FUNCTIONAL_OP[name])))
    for module in ("mindspore.ops", "mindspore.mint"):
        dotted = f"{module}.{snake_case(name)}"
        steps.append((dotted, _resolve(dotted)))
    for dotted, obj in steps:
        section = _platforms(obj) if obj is not None else None
        if section is None:
            continue
        # the first docstring with the section decides, also when it names no platform
        # (e.g. mindspore.ops.UniformReal: "Supported Platforms: Deprecated")
        platforms, text = section
        return platforms, dotted if platforms else f'{dotted} ("Supported Platforms: {text}")'
    return None, None


def documented_platforms(name):
    """The set of platforms (``"Ascend"``, ``"GPU"``, ``"CPU"``) MindSpore's docstrings document
    for primitive ``name`` (empty when the section names none, e.g. "Deprecated"), or None when
    none of them has the section."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"documented_platforms: name must be a primitive name (str), got {name!r}")
    return documentation(name)[0]
