"""The science core: plain Python on Polars frames, numpy arrays and torch tensors.

No Dagster import anywhere below this package (tests/test_layering.py enforces it).
"""
