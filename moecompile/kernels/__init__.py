"""Triton kernel families, one per file beside its reference and op registration (issue: kernels)."""
