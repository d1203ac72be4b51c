"""Prefect flows: plan shards of a corpus, fan them out over Ray, resume, publish the index."""
