"""Text → tokens → sharded batches: the data pipeline of lesson 3.

    text = load_corpus()                        # a public-domain novel shipped with labkit
    tok = CharTokenizer.from_text(text)         # one token per character (78 of them)
    train, val = split_tokens(tok.encode(text)) # first 90 % to train on, last 10 % to validate
    blocks = TokenBlocks(train, block_size=64)  # item i: (x, y), y is x shifted by one token
    loader = distributed_loader(blocks, 16, rank=rank, world_size=world_size)
    for epoch, step, x, y in batches(loader):   # calls sampler.set_epoch(epoch) for you
        ...

In data-parallel training every rank builds the same ``TokenBlocks`` and the sampler hands each
rank a disjoint shard of it: rank r gets blocks perm[r], perm[r + N], perm[r + 2N], ... of one
shuffled permutation that all ranks compute alike from the same seed and epoch number.
"""

from __future__ import annotations

from importlib import resources
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["load_corpus", "CharTokenizer", "split_tokens", "TokenBlocks", "distributed_loader",
           "batches"]


def load_corpus() -> str:
    """The text of *Botchan* (Natsume Sōseki, English translation of 1919; public domain),
    about 255 K characters of plain ASCII. Where it comes from: ``labkit/data/README.md``."""
    # importlib.resources finds the file wherever labkit is installed (a checkout, a wheel, a zip).
    return resources.files("labkit.data").joinpath("botchan.txt").read_text(encoding="utf-8")


class CharTokenizer:
    """The simplest tokenizer: every character is a token, its id its index in ``chars``.

    A real GPT uses sub-word tokens (BPE, ~50 K of them); characters keep the vocabulary tiny, so
    the embedding and output layers stay small and the model's samples are easy to read.
    """

    def __init__(self, chars: Iterable[str]):
        self.chars = tuple(chars)
        if not self.chars:
            raise ValueError("a tokenizer needs at least one character")
        if any(len(c) != 1 for c in self.chars) or len(set(self.chars)) != len(self.chars):
            raise ValueError("chars must be distinct single characters")
        self._id = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The vocabulary of ``text``: its distinct characters, sorted (so the same text always
        gives the same ids, whatever the order in which characters first appear)."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """``text`` as a 1-D LongTensor of token ids. ValueError names a character that has no id."""
        try:
            ids = [self._id[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary "
                             f"({self.vocab_size} characters)") from None
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids) -> str:
        """Token ids (a 1-D tensor or a list of ints) back to text."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes a 1-D sequence of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return "".join(self.chars[i] for i in ids)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def split_tokens(tokens: torch.Tensor, val_fraction: float = 0.1):
    """``(train, val)``: the first ``1 - val_fraction`` of the tokens and the rest (views, no copy).

    A split in one cut, not at random: random blocks would put overlapping neighbourhoods of the
    same sentences on both sides, and the validation loss would flatter the model.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_train = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:n_train], tokens[n_train:]


class TokenBlocks(Dataset):
    """A token sequence cut into non-overlapping blocks of ``block_size`` tokens.

    Item i is ``(x, y)`` with ``x = tokens[i*T : i*T + T]`` and ``y = tokens[i*T + 1 : i*T + T + 1]``:
    at every position t the model sees x[:t+1] and must predict y[t], the next token. Blocks do not
    overlap, so one epoch reads the text once (the last few tokens that do not fill a block are
    left out).
    """

    def __init__(self, tokens: torch.Tensor, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
        # y needs one token beyond the end of x, hence the - 1.
        if len(tokens) - 1 < block_size:
            raise ValueError(f"{len(tokens)} tokens are too few for one block of {block_size} "
                             f"(a block needs block_size + 1 tokens: x and its shifted target y)")
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range (0..{len(self) - 1})")
        start = i * self.block_size
        chunk = self.tokens[start:start + self.block_size + 1]
        return chunk[:-1], chunk[1:]


def distributed_loader(dataset: Dataset, batch_size: int, *, rank: int, world_size: int,
                       seed: int = 0, shuffle: bool = True) -> DataLoader:
    """A DataLoader over this rank's shard of ``dataset``: ``len(dataset) // world_size`` items.

    The shard comes from ``DistributedSampler``; rank and world size are passed in, not read from
    ``torch.distributed``, so the same code runs in a single process (``rank=0, world_size=1``)
    and a notebook can build every rank's loader side by side. ``drop_last=True`` twice:
    - in the sampler, so every rank gets the same number of items (without it, the sampler pads
      the last shards with repeated items, and some examples count twice per epoch);
    - in the loader, so every batch is full and every rank takes the same number of steps
      (a rank with one step more would wait forever in an all-reduce the others never join).
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                 seed=seed, drop_last=True)
    if len(sampler) < batch_size:
        raise ValueError(f"each rank gets {len(sampler)} of the {len(dataset)} items "
                         f"(world_size={world_size}): not one full batch of {batch_size}")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=0)


def batches(loader: DataLoader, *, start_epoch: int = 0) -> Iterator[tuple]:
    """Endless ``(epoch, step_in_epoch, x, y)`` from ``loader``, epoch after epoch.

    At the start of each epoch it calls ``loader.sampler.set_epoch(epoch)``: the sampler seeds its
    shuffle with ``seed + epoch``, so without this call every epoch repeats epoch 0's order. After a
    restart from a checkpoint, ``start_epoch`` continues with that epoch's order.
    """
    if len(loader) == 0:   # otherwise the loop below would spin forever without yielding
        raise ValueError("the loader yields no batch")
    epoch = start_epoch
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for step, (x, y) in enumerate(loader):
            yield epoch, step, x, y
        epoch += 1
