"""Numerical kernels shared by the analyses and the interventions: streaming moments and
reservoir keys, reservoir sample access, normality tests, separation measures and selection,
key-space regions (cubes, ellipsoids), and the paired bootstrap. Nothing here runs a model."""
