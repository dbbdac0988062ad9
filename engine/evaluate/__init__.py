"""Evaluation: classification accuracy and image-text retrieval recall@K."""
