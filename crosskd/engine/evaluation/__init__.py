"""Evaluation: the `Validator` (`crosskd val` and the per-epoch validation), COCO AP through pycocotools or
faster-coco-eval, precision/recall at the best F1 with PR curves and the confusion matrix, and every plot a run
draws."""
