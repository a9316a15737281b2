"""The real SLURM cluster fixture for tests/slurm (see tests/slurm_helpers.py)."""

import os
import shutil

import pytest
from slurm_helpers import SlurmCluster, make_cluster_dir, unavailable_reason


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI") == "true" and os.geteuid() == 0:
            # CI installs the daemons as root (.ci/run): a cluster that cannot start there is a failure,
            # not a reason to report the cluster tier as passed.
            pytest.fail(f"CI=true as root, but the real-SLURM tier cannot run: {reason}", pytrace=False)
        pytest.skip(reason)
    root = make_cluster_dir()
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
