"""Data: shard writers, the shard manifest, Ray Data and in-memory readers, augmentation."""
