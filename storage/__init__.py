"""LMDB shards of compressed binary token representations, and their manifest."""
