"""Models: the Mask R-CNN detectors, the cell-level classifiers and hand-made features, detectron2 weight import."""
