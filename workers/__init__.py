"""Ray workers: tokenize, run the reader's lower layers, binarize, pack, write shards."""

from .quiet import quiet

quiet()  # before Ray is imported anywhere in this process
