"""Data: the synthetic scene generator, the Parquet shard store, and the Taskonomy importer."""
