"""Evaluation: fresh networks trained on a set (``train``), scored by a task (``tasks``: accuracy,
retrieval recall), in one loop over every evaluated set (``run``)."""
