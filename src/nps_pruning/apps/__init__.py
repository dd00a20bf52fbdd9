"""The applications around the numerical core: prune, transfer, merge, compress."""
