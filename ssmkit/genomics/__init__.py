"""HyenaDNA models, the DNA tokenizer, FASTA/BED and benchmark data, official checkpoints."""
