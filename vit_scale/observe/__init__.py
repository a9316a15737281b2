"""Observability: training metrics (throughput, MFU), metrics.jsonl, wandb, reports."""
