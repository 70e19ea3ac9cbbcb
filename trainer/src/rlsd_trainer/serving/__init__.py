"""Our CPU rollout and teacher servers (vLLM's routes), and what they share."""
