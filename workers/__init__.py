"""Ray workers: tokenize, run the reader's lower layers, binarize, pack, write shards."""
