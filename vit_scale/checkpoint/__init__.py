"""Checkpoints: the commit protocol around DeepSpeed's sharded save, resume selection, retention, export."""
