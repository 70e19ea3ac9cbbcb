"""Exit codes of `rlsd-trainer learner`, the one thing the operator reads of a learner (never its logs):

- 0 finished: `run.total_steps` reached, final policy exported (operator: Succeeded).
- 1 failed: an unexpected error (operator: counts against the back-off budget).
- 3 bad configuration or dataset, message on stderr (operator: Failed at once; retrying cannot help).
- 75 preempted: SIGTERM, stopped at a step boundary and saved a checkpoint there (operator: gang
  restart, counted as a preemption, not a failure).
- 76 preempted: SIGTERM, but the grace period ran out before a checkpoint could be saved; the run
  resumes from the previous one (operator: as 75).

The trainer's launcher derives a pod's code from its ranks' (`rlsd_trainer.lifecycle`).
"""

from __future__ import annotations

EXIT_FINISHED = 0
EXIT_FAILED = 1
EXIT_BAD_CONFIG = 3
EXIT_PREEMPTED = 75
EXIT_PREEMPTED_UNSAVED = 76
# Both are preemptions: a gang restart from the latest checkpoint, not counted as a failure.
PREEMPTED = (EXIT_PREEMPTED, EXIT_PREEMPTED_UNSAVED)
