"""What the RLSD trainer and operator agree on, in one place both import (torch-free):

- `config`: the trainer's configuration schema (the operator validates what it renders with it);
- `exit_codes`: what a learner's exit code means and what the operator does about it;
- `wire`: ports, role names and metric names that pods, URLs and scrapes share.
"""

__version__ = "0.1.0"
