"""The training run: initial policy, planner (rollout batches), learner (the loss), checkpoints."""
