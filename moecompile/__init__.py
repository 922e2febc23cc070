"""moecompile: find the MoE blocks of a PyTorch model, describe them, and replace them with fused modules.

Public names only; see ARCHITECTURE.md in the repository for the pipeline.
"""

from .backends.eager import optimize, report
from .errors import MoECompileError
from .fused import FusedMoE
from .passes.log import BlockRecord, Report
from .spec import MLPSpec, MoESpec, MoEWeights, RouterSpec, SharedExpertSpec

__all__ = ["optimize", "report", "FusedMoE", "MoECompileError", "MoESpec", "RouterSpec", "MLPSpec",
           "SharedExpertSpec", "MoEWeights", "Report", "BlockRecord"]
__version__ = "0.1.0"
