"""Packed on-disk / in-memory weight formats."""

from unibcq.formats.bcq import BCQTensor, group_index, num_groups, validate_group_size

__all__ = ["BCQTensor", "group_index", "num_groups", "validate_group_size"]
