"""Prefect flows: plan shards of a corpus, fan them out over Ray, resume, publish the index."""

import os

from workers.quiet import quiet

quiet()  # before Prefect or Ray is imported anywhere in this process
# A direct run's temporary Prefect server first migrates a fresh database; on 2 busy cores that once
# took longer than Prefect's 20 s (a CI run failed to connect), so it gets 90 s unless set otherwise.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
