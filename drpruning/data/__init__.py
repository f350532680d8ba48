"""Domain data: preparation into MDS splits, the dynamic domain mixer, per-domain evaluation, remote
data through mosaicml-streaming, and the checks where prepared data meets a model."""
