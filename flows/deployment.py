"""The deployment's entrypoint (prefect.yaml). Prefect loads an entrypoint file by path, as a
top-level module; importing the flow from the installed package here keeps its tasks pickled under
`flows.index_wikipedia`, which every Ray worker can import."""

from flows.index_wikipedia import index_wikipedia

__all__ = ["index_wikipedia"]
