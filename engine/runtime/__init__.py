"""The thin Ray layer: starting or joining a cluster, experts on Ray Tune, reading data through Ray Data.

Everything under ``engine/`` except this package runs without Ray.
"""
