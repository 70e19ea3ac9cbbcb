"""`python -m rlsd_trainer`: the same command line as `rlsd-trainer` (torchrun starts ranks this way)."""

import os
import sys

from rlsd_trainer.lifecycle import watch_for_preemption

if "RANK" in os.environ:
    watch_for_preemption()  # before the heavy imports below

from rlsd_trainer.cli import main

sys.exit(main())
