"""What a SLURM job knows of its own requeueing, so that a requeued job continues its run in place.

SLURM restarts a requeued job (`scontrol requeue`, preemption in requeue mode, submitit's
requeue at the time limit) with the same command in the same job folder and
SLURM_RESTART_COUNT one higher. vae_lab treats such a restart as resume=true: the guard
lets the job into its own folder and training continues from checkpoints/last.pt.

While a requeue is under way, the controller's count (`scontrol show job`: Restarts=) is
already one above the restarting process's SLURM_RESTART_COUNT, which tells a requeue's
SIGTERM from scancel's (measured on the local cluster of scripts/slurm-local.sh: Restarts=1
for `scontrol requeue`, 0 for `scancel`, as the SIGTERM arrives). A requeued job records
itself as `requeued` and exits without a result, so that submitit waits for its restart.
"""
from __future__ import annotations

import os
import re
import subprocess

SCONTROL_TIMEOUT_S = 5


def restart_count() -> int:
    """How many times SLURM has restarted this job (0 outside SLURM or in the first run)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def is_restart() -> bool:
    """This process is a SLURM job started again after a requeue."""
    return bool(os.environ.get("SLURM_JOB_ID")) and restart_count() > 0


def being_requeued() -> bool:
    """SLURM is requeueing this job now (its controller counts one restart more than this process has)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                               timeout=SCONTROL_TIMEOUT_S).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    found = re.search(r"\bRestarts=(\d+)", shown)
    return found is not None and int(found.group(1)) > restart_count()


def requeued_by_submitit(stop: SystemExit) -> bool:
    """submitit's answer to the preemption / time-limit signal (USR2) in a SLURM job: it requeues the
    job, then exits with -1 (it raises UncompletedJobError instead where it cannot requeue). The
    controller may count the restart only a moment later, so this is not left to being_requeued."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and stop.code == -1
