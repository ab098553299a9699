"""Evaluation without torch: the Kaggle submission codec and the competition metric."""
