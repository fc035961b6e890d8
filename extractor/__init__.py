"""Pathway extraction: neuron contributions, critical pathways and weighted edges of CNNs.

Import submodules directly (``extractor.methods``, ``extractor.records``, ...). This package
file imports nothing heavy, so ``extractor.records`` stays usable without torch.
"""
