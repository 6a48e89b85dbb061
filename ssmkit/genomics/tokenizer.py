"""The HyenaDNA character tokenizer (official ids) and reverse complement of strings and id tensors.

Ids: [CLS]=0 [SEP]=1 [BOS]=2 [MASK]=3 [PAD]=4 [RESERVED]=5 [UNK]=6, A=7 C=8 G=9 T=10 N=11; 12 symbols,
which the model pads to 16 embedding rows. Padding is on the left by default (the model is causal,
so the last position of a left-padded batch is the last base of every sequence).

Lowercase (soft-masked) bases: the official tokenizer is case-sensitive and maps them to [UNK], which
silently corrupts soft-masked FASTA. Here `lowercase="upper"` (the default) reads them as the bases
they are; `lowercase="unk"` reproduces the official behaviour.
"""
from __future__ import annotations

import torch

__all__ = ["CharTokenizer", "reverse_complement", "reverse_complement_ids", "SPECIALS", "BASE_IDS", "VOCAB_SIZE"]

SPECIALS = ("[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]")
BASES = "ACGTN"
CLS, SEP, BOS, MASK, PAD, RESERVED, UNK = range(len(SPECIALS))
BASE_IDS = len(SPECIALS)  # ids >= this are bases (A=7 ... N=11)
VOCAB_SIZE = len(SPECIALS) + len(BASES)  # 12

_COMPLEMENT = str.maketrans("ACGTacgt", "TGCAtgca")
_ID_COMPLEMENT = torch.arange(VOCAB_SIZE)
for _a, _b in ("AT", "CG"):
    _ia, _ib = len(SPECIALS) + BASES.index(_a), len(SPECIALS) + BASES.index(_b)
    _ID_COMPLEMENT[_ia], _ID_COMPLEMENT[_ib] = _ib, _ia


def reverse_complement(seq: str) -> str:
    """Reverse complement of a DNA string: A<->T, C<->G, case kept, N and other characters unchanged."""
    return seq.translate(_COMPLEMENT)[::-1]


def reverse_complement_ids(ids: torch.Tensor) -> torch.Tensor:
    """Reverse complement of token ids (..., L): base ids complemented, specials unchanged, order reversed."""
    return _ID_COMPLEMENT.to(ids.device)[ids].flip(-1)


class CharTokenizer:
    """DNA text <-> ids with HyenaDNA's vocabulary; see the module docstring for ids and case handling."""

    def __init__(self, lowercase: str = "upper", padding_side: str = "left"):
        if lowercase not in ("upper", "unk"):
            raise ValueError(f"lowercase must be 'upper' or 'unk', got {lowercase!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.lowercase, self.padding_side = lowercase, padding_side
        self.vocab = {tok: i for i, tok in enumerate((*SPECIALS, *BASES))}
        table = torch.full((256,), UNK, dtype=torch.long)
        for i, base in enumerate(BASES):
            table[ord(base)] = len(SPECIALS) + i
            if lowercase == "upper":
                table[ord(base.lower())] = len(SPECIALS) + i
        self._table = table
        self.pad_id = PAD

    def __len__(self) -> int:
        return VOCAB_SIZE

    def encode(self, seq: str, add_eos: bool = False, add_cls: bool = False) -> torch.Tensor:
        """Ids (L,) of one sequence; characters outside ACGTN (and lowercase with lowercase='unk') -> [UNK].
        `add_eos` appends [SEP] (as in pretraining), `add_cls` prepends [CLS]."""
        raw = torch.frombuffer(bytearray(seq.encode("latin-1", errors="replace")), dtype=torch.uint8)
        ids = self._table[raw.long()]
        parts = ([torch.tensor([CLS])] if add_cls else []) + [ids] + ([torch.tensor([SEP])] if add_eos else [])
        return torch.cat(parts) if len(parts) > 1 else ids

    def decode(self, ids: torch.Tensor | list[int], skip_special: bool = True) -> str:
        """Text of ids; special tokens are dropped (or written as their names with skip_special=False)."""
        names = (*SPECIALS, *BASES)
        return "".join(names[i] for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)
                       if not (skip_special and i < len(SPECIALS)))

    def pad(self, batch: list[torch.Tensor], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, T), mask (B, T) bool, True on real tokens) of id sequences padded with [PAD] on
        `padding_side` to the longest one (or to `max_length`, which they must not exceed)."""
        longest = max(len(ids) for ids in batch)
        length = max_length if max_length is not None else longest
        if longest > length:
            raise ValueError(f"a sequence of {longest} tokens is longer than max_length {length}")
        ids = torch.full((len(batch), length), PAD, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.bool)
        for row, seq in enumerate(batch):
            span = slice(length - len(seq), length) if self.padding_side == "left" else slice(0, len(seq))
            ids[row, span], mask[row, span] = seq, True
        return ids, mask

    def __call__(self, seqs: list[str], max_length: int | None = None, add_eos: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and pad a batch of strings: (ids, mask)."""
        return self.pad([self.encode(s, add_eos=add_eos) for s in seqs], max_length)
