"""Transfer: fine-tuning, classification eval, few-shot linear evaluation, VTAB-1k, results tables."""
