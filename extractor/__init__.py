"""Pathway extraction: neuron contributions, critical pathways and weighted edges of CNNs.

Import submodules directly (``extractor.methods``, ``extractor.pipeline``, ...). Results are
written as records (the top-level, torch-free ``records`` package).
"""
