"""`--nproc N`: start N ranks on this machine through torch.distributed's elastic agent.

The agent restarts the whole group when a rank fails (up to `max_restarts` times); the restarted
ranks resume from the last committed checkpoint on their own. Each rank runs the same `vit-scale`
command line without `--nproc`, so it sees the torchrun variables and just runs.
"""

from __future__ import annotations

import sys
import uuid

from vit_scale.train.preempt import REQUEUE_EXIT_CODE


def run(nproc: int, argv: list[str], *, max_restarts: int = 3) -> int:
    """Run `python -m vit_scale.cli ARGV` as `nproc` local ranks; returns the command's exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # a free port, as torchrun --standalone
        max_restarts=max_restarts,
        monitor_interval=0.5,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "vit_scale.cli", *argv)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        # A rank's own verdict wins over the agent's generic failure: requeue, or a user error it printed.
        for code in (REQUEUE_EXIT_CODE, 2):
            if code in codes:
                return code
        return 1
    return 0
