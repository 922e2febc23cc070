"""moecompile: find the MoE blocks of a PyTorch model, describe them, and replace them with fused modules.

Public names only; see docs/pipeline.md in the repository for the pipeline, and state.py for what is kept between
calls (reset() forgets it).
"""

__version__ = "0.1.0"  # before the imports: checkpoint.py records it

from .backends.dynamo import backend
from .backends.onnx import export_onnx, export_report
from .checkpoint import convert, from_pretrained
from .ep_checkpoint import load_expert_parallel, save_for_expert_parallel
from .errors import MoECompileError
from .expert_parallel import ExpertParallelMoE, shard_experts
from .fused import FusedMoE
from .hf_experts import register_transformers
from .passes.log import BlockRecord, Report
from .passes.routing import RoutingChange
from .pipeline import optimize, quantize_experts, report, rewrite_routing
from .remoe import ReMoERegularizer
from .spec import AuxLossSpec, MLPSpec, MoESpec, MoEWeights, RouterSpec, SharedExpertSpec
from .state import kept_state, reset
from .stats import LayerStats, routing_stats

__all__ = ["optimize", "report", "FusedMoE", "MoECompileError", "MoESpec", "RouterSpec", "MLPSpec",
           "SharedExpertSpec", "AuxLossSpec", "MoEWeights", "Report", "BlockRecord", "rewrite_routing",
           "quantize_experts", "RoutingChange",
           "routing_stats", "LayerStats", "ReMoERegularizer", "convert", "from_pretrained", "backend",
           "export_onnx", "export_report", "reset", "kept_state", "register_transformers", "shard_experts",
           "ExpertParallelMoE", "save_for_expert_parallel", "load_expert_parallel"]
