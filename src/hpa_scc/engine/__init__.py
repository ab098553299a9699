"""Training: the loop (one epoch, validation), distributed setup, and ``train`` that composes them."""
