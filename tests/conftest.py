"""pytest loads this file first, and with it puts tests/ on sys.path (pytest's "prepend" import mode for a
rootdir conftest outside a package): every test imports the shared helpers (data_helpers, train_helpers,
transfer_helpers, slurm_helpers) by name, with no sys.path edits of its own."""
