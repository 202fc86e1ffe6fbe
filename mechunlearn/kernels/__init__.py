"""Numerical kernels shared by the analyses and the interventions: streaming moments and
reservoir keys, reservoir sample access, normality tests, separation measures and selection,
key-space regions (cubes, ellipsoids), the paired bootstrap, and the ranking of scored candidates
under a floor (every hyperparameter choice). Nothing here runs a model."""
