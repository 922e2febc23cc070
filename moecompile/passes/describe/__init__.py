"""Detect, step 2: read a proposed candidate into an MoESpec and a recipe for its canonical weights.

Place in the pipeline: detect (propose) -> **describe** -> confirm -> fuse.

Structure gives a small set of hypotheses (which tensor is the router, the gate/up/down roles and layouts of the
expert weights, k and the scaling factor from the module's attributes); execution picks among them. Each hypothesis is
run through the reference and compared with the candidate itself, on a float32 working copy of the candidate whose
tensors are re-randomised (copies.py: on the CPU, so a zero-initialised bias cannot hide) and on fresh random
inputs. The experts are matched on their own where they can be called alone (a ModuleList expert, an HF `*Experts`
module), which keeps the joint search over router hypotheses small. A hypothesis that matches on random inputs is
then weighed against its neighbours on aimed inputs (probes.py; the copy's [E] vectors as drawn and redrawn around
-0.3): random inputs do not tell a masked group filled with 0.0 from one filled with -inf, aimed ones do. The first
of the hypothesis and its neighbours that reproduces the copy there is the description. Where nothing matches,
describe raises `DescribeError` with the closest hypothesis and its error: the candidate is then left alone.

The parts: search.py (describe itself: the working copy, the search, the aimed refinement, peels), experts.py (the
expert and shared-expert hypotheses), router.py (the router hypotheses, RouterHypothesis), outputs.py (scaling
factor, auxiliary loss and returned structures), tensors.py (tensor access relative to the candidate, canonical
weights), base.py (Description, DescribeError, MATCH_RTOL).
"""

from .base import MATCH_RTOL, DescribeError, Description
from .search import describe
from .tensors import KEEP_AUTOGRAD

__all__ = ["KEEP_AUTOGRAD", "MATCH_RTOL", "DescribeError", "Description", "describe"]
