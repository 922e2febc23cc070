"""Hooks on MoE blocks: the block's own hooks fire on the FusedMoE after optimize (not on optimize's own inputs);
a block with hooks inside it, or a forward replaced on the instance, is left with the reason. fp32, 1e-5 abs."""
import handwritten as hw
import pytest
import torch

import moecompile


def _model():
    torch.manual_seed(0)
    return hw.DeepModel().eval()


@pytest.mark.parametrize("inplace", [False, True])
def test_block_hooks_carry_over(inplace, quiet):
    model = _model()
    block = model.layers[0].ffn[0]
    seen = {"pre": [], "fwd": []}

    def pre_hook(module, args, kwargs):
        seen["pre"].append(args[0].shape)
        return (args[0] * 0.5,), kwargs  # a pre-hook that changes the input: its meaning must be kept

    def fwd_hook(module, args, output):
        seen["fwd"].append(type(module).__name__)
        return output + 1.0

    handles = [block.register_forward_pre_hook(pre_hook, with_kwargs=True), block.register_forward_hook(fwd_hook)]
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        want = model(x)
    seen["pre"].clear(), seen["fwd"].clear()
    optimized = moecompile.optimize(model, inplace=inplace)
    assert moecompile.report(optimized).blocks[0].decision == "fused"
    assert seen == {"pre": [], "fwd": []}  # optimize's random inputs never reach the user's hooks
    fused = optimized.layers[0].ffn[0]
    assert isinstance(fused, moecompile.FusedMoE)
    with torch.no_grad():
        got = optimized(x)
    assert seen == {"pre": [(3, 5, 32)], "fwd": ["FusedMoE"]}
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if inplace:  # the handles the user holds still work
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            optimized(x)
        assert len(seen["fwd"]) == 1


def test_block_with_inner_hooks_is_left(quiet):
    model = _model()
    calls = []
    model.layers[0].ffn[0].router.register_forward_hook(lambda m, a, o: calls.append(o.shape))
    optimized = moecompile.optimize(model)
    records = {r.path: r for r in moecompile.report(optimized).blocks}
    left = records["layers.0.ffn.0"]
    assert left.decision == "left" and "hooks on modules inside it (router (1 forward hooks))" in left.reason
    assert records["layers.2.ffn.0"].decision == "fused"  # the other block is not held back
    assert calls == []
    with torch.no_grad():
        optimized(torch.randn(2, 3, 8))
    assert calls == [(6, 6)]  # the hook still fires: its module still runs


def test_block_with_replaced_forward_is_left(quiet):
    model = _model()
    block = model.layers[2].ffn[0]
    original = block.forward
    block.forward = lambda x: original(x)  # what Accelerate's add_hook_to_module does
    records = {r.path: r for r in moecompile.report(moecompile.optimize(model)).blocks}
    assert records["layers.2.ffn.0"].decision == "left"
    assert "forward is replaced on the instance" in records["layers.2.ffn.0"].reason
