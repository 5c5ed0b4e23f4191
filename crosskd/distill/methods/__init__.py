"""KD methods as objects: one file per method (crosskd, pm, ld, pkd), each a `KDMethod` named in the registry."""
