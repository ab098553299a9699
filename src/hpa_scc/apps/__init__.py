"""The steps a user runs, each composing the stages below it: prepare, predict, refine, visualize, demo."""
