"""The deployments' entrypoints (prefect.yaml). Prefect loads an entrypoint file by path, as a
top-level module; importing the flows from the installed package here keeps their tasks pickled
under `flows.index_wikipedia` / `flows.train_reader`, which every Ray worker can import."""

from flows.index_wikipedia import index_wikipedia
from flows.train_reader import train_reader

__all__ = ["index_wikipedia", "train_reader"]
