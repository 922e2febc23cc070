"""Errors moecompile raises; every message names the module path, the problem and the way out."""


class MoECompileError(RuntimeError):
    """A model, block, flag or file that moecompile cannot handle as asked."""
