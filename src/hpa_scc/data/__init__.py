"""Data: reading HPA images, the synthetic generator, public HPA downloads, folds, job-array shards,
the image cache, and the prepared set (its COCO folds) as training samples."""
