"""Moving policy weights from the learner to servers: wire formats, sender, receiver."""
