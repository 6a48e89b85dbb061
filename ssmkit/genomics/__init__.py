"""HyenaDNA models, the DNA tokenizer, FASTA/BED and benchmark data, official checkpoints.

Importing this package registers the HyenaDNA configurations (`hyenadna_tiny_1k`, ..., `hyenadna_large_1m`)
with ssmkit's model registry, and the official checkpoints with `ssmkit.load_official`.
"""
from ssmkit.genomics import checkpoints, hyenadna  # noqa: F401  (register the model configs, official weights)
from ssmkit.genomics.hyenadna import HyenaDNAClassifier, HyenaDNAConfig, HyenaDNALM
from ssmkit.genomics.tokenizer import CharTokenizer, reverse_complement, reverse_complement_ids

__all__ = ["HyenaDNAConfig", "HyenaDNALM", "HyenaDNAClassifier", "CharTokenizer", "reverse_complement",
           "reverse_complement_ids"]
