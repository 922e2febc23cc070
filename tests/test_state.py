"""What moecompile keeps between calls is listed in one place (moecompile.state) and reset() forgets it."""
import pytest
import torch

import moecompile
from moecompile import hf_zoo


def test_reset_forgets_reports_and_compiled_descriptions(quiet):
    model = hf_zoo.build("qwen3_moe", "grouped_mm")
    optimized = moecompile.optimize(model)
    compiled = torch.compile(hf_zoo.build("qwen3_moe", "grouped_mm"), backend="moecompile",
                             options={"inductor": False})
    hf_zoo.model_output(compiled, hf_zoo.example_inputs(compiled))
    held = moecompile.kept_state()
    assert held["pipeline: optimize's report by model"] >= 1
    assert held["backends.dynamo: a report per compiled graph"] >= 1
    assert held["backends.graph_blocks: descriptions of graph regions by program"] >= 1
    moecompile.reset()
    assert set(moecompile.kept_state().values()) == {0}
    with pytest.raises(moecompile.MoECompileError, match="has not been through moecompile.optimize"):
        moecompile.report(optimized)
    assert moecompile.report(moecompile.optimize(model)).fused  # works as before afterwards


def test_every_module_level_container_of_the_package_is_listed():
    """A private dict/list/weak dictionary at module level in moecompile is listed state: constant tables are
    tuples or read-only mappings (or public upper-case names)."""
    import importlib
    import pkgutil
    import weakref
    from collections import OrderedDict

    listed = {id(k.container) for k in moecompile.state._KEPT}
    unlisted = []
    for info in pkgutil.walk_packages(moecompile.__path__, "moecompile."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            mutable = isinstance(value, (dict, list, OrderedDict, weakref.WeakKeyDictionary,
                                         weakref.WeakValueDictionary))
            if mutable and name.startswith("_") and not name.startswith("__") and id(value) not in listed \
                    and value is not moecompile.state._KEPT:
                unlisted.append(f"{info.name}.{name}")
    assert unlisted == [], f"module-level state not created through state.kept(): {unlisted}"
