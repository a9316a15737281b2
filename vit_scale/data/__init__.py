"""Shard writing, shard sources, and the streaming pipeline that feeds training and evaluation."""
