"""Where the real SLURM cluster cannot start, tests/slurm skip with a reason that says what is missing."""



from slurm_helpers import unavailable_reason


def test_missing_binaries_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    reason = unavailable_reason()
    assert reason.startswith("SLURM/munge binaries missing (munged, mungekey, slurmctld")
    assert ".ci/run installs them" in reason


def test_non_root_is_told_why(monkeypatch, tmp_path):
    for name in (
        "munged",
        "mungekey",
        "slurmctld",
        "slurmd",
        "sbatch",
        "scontrol",
        "squeue",
        "scancel",
        "sinfo",
    ):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert "need root" in unavailable_reason()
