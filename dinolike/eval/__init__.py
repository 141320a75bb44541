"""Frozen-feature extraction and kNN: the evaluation that training itself runs (its periodic kNN).

The eval commands (`eval/`: knn, linear, logreg) build on these with checkpoints, the feature cache,
their own config section and result files; the library never reaches up into them.
"""
