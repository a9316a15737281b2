"""`--nproc N`: start N ranks on this machine through torch.distributed's elastic agent.

A group whose rank crashed is started again (up to `max_restarts` times); the new ranks resume from
the last committed checkpoint on their own. A rank's own verdict is final and never restarted: a user
error (exit 2) would only fail again, and a requeue request (exit 75) asks for a new allocation. Each
rank runs the same `vit-scale` command line without `--nproc`, so it sees the torchrun variables.
"""

from __future__ import annotations

import sys
import uuid


def run(nproc: int, argv: list[str], *, max_restarts: int, final_exit_codes: tuple[int, ...]) -> int:
    """Run `python -m vit_scale.cli ARGV` as `nproc` local ranks; returns the command's exit status. A rank
    exiting with one of `final_exit_codes` ends the group with that code, without a restart."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for attempt in range(max_restarts + 1):
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=uuid.uuid4().hex,
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",  # a free port, as torchrun --standalone
            max_restarts=0,  # restarts are decided here, where the ranks' exit codes are known
            monitor_interval=0.5,
        )
        try:
            elastic_launch(config, sys.executable)("-m", "vit_scale.cli", *argv)
            return 0
        except ChildFailedError as e:
            codes = {f.exitcode for f in e.failures.values()}
        for code in final_exit_codes:
            if code in codes:
                return code
        if attempt < max_restarts:
            print(f"vit-scale: a rank failed (exit codes {sorted(codes)}); restarting the group "
                  f"({attempt + 1}/{max_restarts}) from the last committed checkpoint", file=sys.stderr)
    return 1
