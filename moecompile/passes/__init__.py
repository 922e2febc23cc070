"""Passes of the pipeline: detect (propose), describe, confirm, fuse, and the manager and log that drive them."""
