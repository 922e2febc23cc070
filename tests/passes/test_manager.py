"""The pass manager (passes/manager.py): passes run in order and each run is recorded; the analysis passes never
change the model; the fuse pass swaps every confirmed block in or none; a block shaped and described like one
confirmed before is confirmed on its own weights only."""
import handwritten as hw
import pytest
import torch
from model_state import same_state, state

import moecompile
from moecompile.passes import manager
from moecompile.passes.log import Report


def test_analysis_passes_record_their_runs_and_leave_the_model(quiet):
    model = hw.ListMoE().eval()
    saved = state(model)
    ctx = manager.PassContext(model=model, report=Report(model_type="ListMoE"))
    report = manager.PassManager(manager.ANALYSIS_PASSES).run(ctx)
    assert [p.name for p in report.passes] == ["detect", "hooks", "describe", "confirm"]
    assert not any(p.modified for p in report.passes) and all(p.seconds >= 0 for p in report.passes)
    assert same_state(model, saved) and ctx.model is model
    (record,) = report.blocks
    assert record.decision == "pending" and record.spec_summary and record.rel_error is not None
    manager.PassManager([manager.FusePass]).run(ctx)
    assert report.passes[-1].name == "fuse" and report.passes[-1].modified
    assert isinstance(ctx.model, moecompile.FusedMoE) and record.decision == "fused"


def test_a_pass_the_manager_does_not_know_runs_in_its_place(quiet):
    """The manager knows no single pass: any object with a name and run(context) -> bool takes part."""
    class CountBlocks:
        name = "count"

        def __init__(self):
            self.seen = None

        def run(self, ctx):
            self.seen = len(ctx.pending())
            return False

    counter = CountBlocks()
    ctx = manager.PassContext(model=hw.ListMoE().eval(), report=Report(model_type="ListMoE"))
    report = manager.PassManager([manager.DetectPass, counter]).run(ctx)
    assert counter.seen == 1 and [p.name for p in report.passes] == ["detect", "count"]


def test_layers_alike_are_rerandomised_once(mixtral, quiet):
    """Mixtral's layers share class, shapes and description: the first gets the re-randomised checks, the others
    are confirmed on their own weights, and the log says so."""
    report = moecompile.report(moecompile.optimize(mixtral))
    first, *others = report.blocks
    assert others and all(b.decision == "fused" for b in report.blocks)
    assert "re-randomised checks as" not in first.method
    assert all(f"re-randomised checks as {first.path}" in b.method for b in others)


def test_layers_alike_are_described_once(mixtral, monkeypatch, quiet):
    """describe reads a block on redrawn weights, so a layer of the same structure takes the first one's reading
    (a 48-layer model is read once, not 48 times); each layer is still confirmed on its own weights."""
    calls = []
    real = manager.describe
    monkeypatch.setattr(manager, "describe", lambda candidate, **kw: calls.append(candidate.path) or real(
        candidate, **kw))
    report = moecompile.report(moecompile.optimize(mixtral))
    first, *others = report.blocks
    assert calls == [first.path] and others
    assert all(b.decision == "fused" and f"read as {first.path}" in b.method and b.spec == first.spec
               for b in others)
    assert all(sum(b.confirm_tokens) >= 3000 for b in report.blocks)


def test_a_layer_with_other_settings_is_described_on_its_own(mixtral, monkeypatch, quiet):
    """A setting that is not a tensor (top_k here) or an integer buffer's content makes another structure."""
    from moecompile.passes.structure import structure_key

    one, two = (layer.mlp for layer in mixtral.model.layers)
    assert structure_key(one) == structure_key(two)
    two.gate.top_k = 1
    assert structure_key(one) != structure_key(two)
    two.gate.top_k = one.gate.top_k
    one.register_buffer("table", torch.arange(4))
    two.register_buffer("table", torch.arange(4).flip(0))
    assert structure_key(one) != structure_key(two)
    del one.table, two.table
    two.gate.top_k = 1
    report = moecompile.report(moecompile.optimize(mixtral))
    assert [b.spec["router"]["top_k"] for b in report.blocks] == [2, 1]
    assert all("read as" not in b.method for b in report.blocks)


def test_failure_half_way_leaves_model_as_it_was(mixtral, monkeypatch, quiet):
    saved = state(mixtral)
    calls = []
    real = manager.FusedMoE

    def second_one_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure while building the second replacement")
        return real(*args, **kwargs)

    monkeypatch.setattr(manager, "FusedMoE", second_one_fails)
    with pytest.raises(RuntimeError, match="injected"):
        moecompile.optimize(mixtral, inplace=True)
    assert same_state(mixtral, saved)

    # the swap itself fails on the second block: the first one is put back
    monkeypatch.setattr(manager, "FusedMoE", real)
    layer1 = mixtral.model.layers[1]
    original_setattr = type(layer1).__setattr__

    def refuse(self, name, value):
        if name == "mlp" and isinstance(value, moecompile.FusedMoE):
            raise RuntimeError("injected failure during the swap")
        original_setattr(self, name, value)

    monkeypatch.setattr(type(layer1), "__setattr__", refuse)
    with pytest.raises(RuntimeError, match="during the swap"):
        moecompile.optimize(mixtral, inplace=True)
    monkeypatch.undo()
    assert same_state(mixtral, saved)
