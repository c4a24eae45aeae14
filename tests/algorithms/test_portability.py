"""Backend portability, checked rather than claimed: every primitive of each algorithm's compiled
GRAPH_MODE training graph (rows of ``algorithm_settings.py``) must be documented by MindSpore for
both Ascend and GPU, or be in the reviewed allow-list ``portability_allowlist.yaml``, whose entries
say how they were verified. This is what "runs on Ascend and GPU" rests on until a run there is
possible. Each row trains in a fresh process with the IR dump on (``ms_prune.portability``)."""
import os

import pytest
import yaml

from ms_prune.portability import (GraphPrimitives, documentation, documented_platforms, graph_primitives,
                                  parse_ir, snake_case)

from .algorithm_settings import ALGORITHM_SETTINGS
from .test_algorithm_suite import build

ROWS = sorted(ALGORITHM_SETTINGS)
REQUIRED = {"Ascend", "GPU"}
ALLOWLIST_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "portability_allowlist.yaml")


def load_allowlist():
    with open(ALLOWLIST_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def train_row(row):
    """Runs in the child process of ``graph_primitives``: the row's Trainer, for the steps the
    generic suite trains (so every graph the suite compiles is seen, including after surgery)."""
    build(row, ALGORITHM_SETTINGS[row]["steps"]).fit()


def offenders(found, allowed):
    """Lines naming each primitive of ``found`` (a GraphPrimitives) that MindSpore does not
    document for both Ascend and GPU and that ``allowed`` does not list: its documented platforms,
    the graphs it is in, and the source lines it comes from."""
    lines = []
    for name in sorted(found.names):
        platforms, where = documentation(name)
        if (platforms is not None and REQUIRED <= platforms) or name in allowed:
            continue
        documented = (f"documented for {sorted(platforms)} in {where}" if platforms
                      else f"documented for no platform in {where}" if platforms is not None else "undocumented")
        graphs = "+".join(g for g, d in (("frontend", found.frontend), ("CPU kernel", found.kernel)) if name in d)
        lines.append(f"  {name}: {documented}; in the {graphs} graph; from {found.origins(name)[:3]}")
    return lines


@pytest.mark.parametrize("row", ROWS)
def test_compiled_training_graph_is_documented_for_ascend_and_gpu(row):
    found = graph_primitives(train_row, row)
    offending = offenders(found, load_allowlist())
    assert not offending, (
        f"row {row!r}: primitives not documented by MindSpore for both Ascend and GPU and not in "
        f"{os.path.basename(ALLOWLIST_PATH)} (add an entry only with how it was verified):\n" + "\n".join(offending))


def test_the_check_names_undocumented_and_single_backend_primitives():
    found = GraphPrimitives(frontend={"MatMul": {"m.py:1"}, "PowTensorScalar": {"m.py:2"}, "MadeUpOp": {"m.py:3"}},
                            kernel={"MatMul": {"m.py:1"}, "MakeTuple": set()})
    lines = offenders(found, allowed={"MakeTuple": {}})
    assert len(lines) == 2, lines
    assert lines[0].startswith("  MadeUpOp: undocumented; in the frontend graph; from ['m.py:3']"), lines
    assert "PowTensorScalar: documented for ['Ascend']" in lines[1], lines
    assert offenders(found, allowed={"MakeTuple": {}, "MadeUpOp": {}, "PowTensorScalar": {}}) == []


def test_allowlist_entries_say_how_they_were_verified_and_are_still_needed():
    allowed = load_allowlist()
    assert allowed, "the allow-list is empty or missing"
    for name, entry in allowed.items():
        assert isinstance(entry, dict) and set(entry) == {"why", "verified"}, (name, entry)
        assert all(isinstance(v, str) and len(v.strip()) > 10 for v in entry.values()), (name, entry)
        platforms = documented_platforms(name)
        assert platforms is None or not REQUIRED <= platforms, (
            f"{name} is now documented for {sorted(platforms)}: remove its allow-list entry")


def test_documented_platforms_reads_mindspores_docstrings():
    # the primitive class's own docstring
    assert documented_platforms("MatMul") == {"Ascend", "GPU", "CPU"}
    assert documentation("MatMul")[1] == "mindspore.ops.MatMul"
    # a generated primitive: its docstring links the functional op that documents it
    assert documented_platforms("Sigmoid") == {"Ascend", "GPU", "CPU"}
    assert documentation("Sigmoid")[1] == "mindspore.ops.sigmoid"
    # documented for one backend only
    assert documented_platforms("PowTensorScalar") == {"Ascend"}
    # a section naming no platform: an empty set, the text quoted
    assert documented_platforms("UniformReal") == set()
    assert documentation("UniformReal")[1] == 'mindspore.ops.UniformReal ("Supported Platforms: Deprecated")'
    # a backward primitive has no platform documentation
    assert documented_platforms("SigmoidGrad") is None
    assert documented_platforms("NoSuchPrimitiveXyz") is None
    assert documentation("NoSuchPrimitiveXyz") == (None, None)
    with pytest.raises(TypeError, match="name"):
        documented_platforms(None)


def test_snake_case_is_the_explicit_rule():
    assert snake_case("BiasAdd") == "bias_add"
    assert snake_case("GatherDGradV2") == "gather_d_grad_v2"
    assert snake_case("ReLU") == "re_lu"  # not relu: such names need a FUNCTIONAL_OP entry, never a guess


IR_SAMPLE = """# IR entry: @kernel_graph0
subgraph @kernel_graph0() {
  %0(CNode_1) = PrimFunc_Sigmoid(%para1_x) cnode_attrs: {}
      : (<Tensor[Float32], (2, 4)>) -> (<Tensor[Float32], (2, 4)>)
      # In file /site-packages/mindspore/nn/cell.py:10, 4~8/    x/
      # In file /work/model.py:14, 15~26/        return ops.sigmoid(x) * 2/
  %1(CNode_2) = @sub_graph(%0)
  %2(CNode_3) = MakeTuple(%1)
  Return(%2)
}
# Order:
#   1: @kernel_graph0:CNode_741{[0]: ValueNode<Primitive> Return, [1]: CNode_740}
"""


def test_parse_ir_keeps_primitives_and_their_origin_and_skips_graph_calls(tmp_path):
    path = tmp_path / "graph_build_0_0001.ir"
    path.write_text(IR_SAMPLE.replace("/site-packages/mindspore/", f"{os.sep}site-packages{os.sep}mindspore{os.sep}"))
    found = parse_ir(str(path))
    assert set(found) == {"Sigmoid", "MakeTuple", "Return"}
    assert [o.endswith("model.py:14") for o in found["Sigmoid"]] == [True]


def tiny_graph_step():
    import numpy as np
    from mindspore import Tensor, nn, ops

    class Net(nn.Cell):
        def construct(self, x):
            return ops.sigmoid(x) * 2

    Net()(Tensor(np.ones((2, 3), np.float32)))


def test_graph_primitives_reads_the_dumped_graph():
    found = graph_primitives(tiny_graph_step)
    assert "Sigmoid" in found.frontend and "Sigmoid" in found.kernel
    assert "Muls" in found.frontend  # x * 2 as the frontend emits it ...
    assert "Mul" in found.kernel and "Muls" not in found.kernel  # ... and as the CPU backend expands it


def test_graph_primitives_refuses_what_a_child_process_cannot_import():
    with pytest.raises(TypeError, match="module-level"):
        graph_primitives(lambda: None)


def failing_step():
    raise ValueError("boom in the child")


def test_graph_primitives_reports_the_child_s_error():
    with pytest.raises(RuntimeError, match="boom in the child"):
        graph_primitives(failing_step)
