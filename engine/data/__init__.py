"""Data pipeline: token shards on disk, the sample stream built from them, and the tools around them.

Nothing in this package imports torch, so the preprocessing tools start fast.
"""
