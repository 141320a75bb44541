"""Evaluation commands: kNN, linear probe and logistic regression on frozen features, plus pictures.

Commands: `python -m eval knn|linear|logreg|plot|viz` (also `dinolike eval ...`, `dinolike plot`,
`dinolike viz`). Protocol functions for programmatic use: `dinolike.evaluation.knn.knn_eval`,
`eval.linear.linear_probe`, `eval.logreg.logreg_eval`, with features from
`dinolike.evaluation.features.extract_features` (the library part that training's periodic kNN uses too).
"""
