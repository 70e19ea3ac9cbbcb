"""Loading models and computing log-probs over packed, padding-free batches."""
