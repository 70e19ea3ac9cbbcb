"""Training and evaluation rows: where they come from and the order the trainer visits them."""
