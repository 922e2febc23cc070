"""Expert-parallel checkpoints (ep_checkpoint.py): an optimized tiny Qwen3-MoE saved once, loaded by 2 and 4 gloo
processes, each reading only its own experts.

Checked per rank: the logits on the rank's own tokens (uneven counts, one rank with a single token) against the
optimized model in one process, normwise relative error <= 1e-5 in fp32 (the sum over a token's experts is taken in
another order); every expert tensor read as a slice holding exactly the rank's experts, never whole; the report.
Refused with the reason: a world size that does not divide E (before anything is read), a plain checkpoint, a model
that is not optimized, a model without a transformers config, an existing output; a failed save leaves no output.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors
import torch
import torch.distributed as dist
from dist_harness import free_port, spawn

import moecompile
from moecompile import hf_zoo
from moecompile.ep_checkpoint import WEIGHTS, load_expert_parallel, save_for_expert_parallel
from moecompile.expert_parallel import EXPERT_TENSORS

EXPERTS = 8  # hf_zoo's tiny qwen3_moe


def _optimized():
    torch.manual_seed(0)
    model = hf_zoo.build("qwen3_moe").float()
    for layer in model.model.layers:  # uneven load: the first experts score higher
        with torch.no_grad():
            layer.mlp.gate.weight[:2] += 0.3
    return moecompile.optimize(model)


def _ids(rank: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, 1 if rank == 1 else 5 + 3 * rank), generator=torch.Generator().manual_seed(rank))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """The checkpoint, and beside it each rank's expected logits computed by the model in this process."""
    root = tmp_path_factory.mktemp("ep")
    model = _optimized()
    save_for_expert_parallel(model, root / "ckpt")
    with torch.no_grad():
        for rank in range(4):
            torch.save(model(input_ids=_ids(rank, model.config.vocab_size)).logits, root / f"want{rank}.pt")
    return root


class _Recording:
    """safetensors.safe_open, recording which tensors are read whole and which slices are taken."""

    def __init__(self, opened, log: list):
        self._f, self._log = opened, log

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def keys(self):
        return self._f.keys()

    def metadata(self):
        return self._f.metadata()

    def get_tensor(self, name):
        self._log.append(("whole", name, None))
        return self._f.get_tensor(name)

    def get_slice(self, name):
        log, sliced = self._log, self._f.get_slice(name)

        class Slice:
            def __getitem__(self, index):
                log.append(("slice", name, (index.start, index.stop)))
                return sliced[index]
        return Slice()


def _load_and_compare(rank: int, world: int) -> None:
    root = Path(os.environ["EP_CKPT_ROOT"])
    reads: list = []
    real_open = safetensors.safe_open
    safetensors.safe_open = lambda *a, **k: _Recording(real_open(*a, **k), reads)
    try:
        model = load_expert_parallel(root / "ckpt")
    finally:
        safetensors.safe_open = real_open
    local = EXPERTS // world
    expert_reads = [r for r in reads if r[1].rsplit(".", 1)[-1] in EXPERT_TENSORS]
    assert expert_reads and all(kind == "slice" and span == (rank * local, (rank + 1) * local)
                                for kind, _, span in expert_reads), expert_reads
    blocks = [m for m in model.modules() if isinstance(m, moecompile.ExpertParallelMoE)]
    assert len(blocks) == 2 and all(b.w1.shape[0] == local for b in blocks)
    assert f"rank {rank} of {world}" in moecompile.report(model).passes[-1].note
    with torch.no_grad():
        got = model(input_ids=_ids(rank, model.config.vocab_size)).logits
    want = torch.load(root / f"want{rank}.pt")
    assert ((got - want).norm() / want.norm()).item() <= 1e-5


def _indivisible(rank: int, world: int) -> None:
    root = Path(os.environ["EP_CKPT_ROOT"])
    with pytest.raises(moecompile.MoECompileError, match="8 experts, not divisible by the group's 3 ranks"):
        load_expert_parallel(root / "ckpt")


SCENARIOS = {"load": _load_and_compare, "indivisible": _indivisible}


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_reads_its_experts_and_matches_one_process(world, saved, tmp_path, monkeypatch):
    monkeypatch.setenv("EP_CKPT_ROOT", str(saved))  # the spawned ranks inherit the environment
    spawn(world, "test_ep_checkpoint", "load", tmp_path)


def test_world_size_not_dividing_experts_is_refused(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("EP_CKPT_ROOT", str(saved))
    spawn(3, "test_ep_checkpoint", "indivisible", tmp_path)


def test_plain_checkpoint_and_missing_files_are_refused(tmp_path, quiet):
    model = hf_zoo.build("qwen3_moe")
    model.save_pretrained(tmp_path / "plain")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(moecompile.MoECompileError, match="no moecompile expert-parallel metadata"):
            load_expert_parallel(tmp_path / "plain")
        with pytest.raises(moecompile.MoECompileError, match="needs config.json and model.safetensors"):
            load_expert_parallel(tmp_path / "nothing")
    finally:
        dist.destroy_process_group()


def test_load_without_torch_distributed_is_refused(saved):
    with pytest.raises(moecompile.MoECompileError, match="not initialised"):
        load_expert_parallel(saved / "ckpt")


def test_save_refusals_leave_no_output(tmp_path, quiet):
    model = hf_zoo.build("qwen3_moe")
    with pytest.raises(moecompile.MoECompileError, match="no fused MoE block"):
        save_for_expert_parallel(model, tmp_path / "a")
    with pytest.raises(moecompile.MoECompileError, match="no transformers config"):
        save_for_expert_parallel(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "b")
    optimized = moecompile.optimize(model)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    with pytest.raises(moecompile.MoECompileError, match="already exists"):
        save_for_expert_parallel(optimized, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["keep.txt"]


def test_saved_metadata_names_each_block(saved):
    with safetensors.safe_open(str(saved / "ckpt" / WEIGHTS), framework="pt") as f:
        meta = json.loads(f.metadata()["moecompile"])
        names = set(f.keys())
    assert [b["path"] for b in meta["blocks"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(f"{b['path']}.w1" in names and "w1" in b["parameters"] for b in meta["blocks"])


def test_tied_embeddings_are_stored_once_and_tied_again(tmp_path, quiet):
    """A tensor under two names (tied input and output embeddings) is written once; loading gives both names the
    same tensor, and the logits match (fp32, 1e-5 normwise), in a group of one process."""
    model = _optimized()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    save_for_expert_parallel(model, tmp_path / "tied")
    with safetensors.safe_open(str(tmp_path / "tied" / WEIGHTS), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        loaded = load_expert_parallel(tmp_path / "tied")
        ids = _ids(0, model.config.vocab_size)
        with torch.no_grad():
            want, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    finally:
        dist.destroy_process_group()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
