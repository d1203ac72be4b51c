"""Prefect flows: plan shards of a corpus, fan them out over Ray, resume, publish the index."""

from .quiet import quiet

quiet()  # before Prefect or Ray is imported anywhere in this process
