"""labkit.text: the shipped corpus, the character tokenizer, blocks, and sharded loading."""

import hashlib
from importlib import resources

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from labkit.text import (CharTokenizer, TokenBlocks, batches, distributed_loader, load_corpus,
                         split_tokens)

CORPUS_SHA256 = "777cdd61e668a6617f481873ca8af4b332cef43bef005f9e9ee69c089b40890d"


@pytest.fixture(scope="module")
def text():
    return load_corpus()


@pytest.fixture(scope="module")
def tok(text):
    return CharTokenizer.from_text(text)


def block_ids(x, block_size):
    """The block index of each row of a batch built from TokenBlocks(torch.arange(...))."""
    return (x[:, 0] // block_size).tolist()


# --- the corpus --------------------------------------------------------------------------------

def test_corpus_is_the_book_only(text):
    raw = resources.files("labkit.data").joinpath("botchan.txt").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == CORPUS_SHA256          # the file README.md describes
    assert not raw.startswith(b"\xef\xbb\xbf") and b"\r" not in raw  # no BOM, LF line endings
    assert text.isascii() and len(text) == 255_141
    assert all(c.isprintable() or c == "\n" for c in set(text))      # no stray control characters
    assert text.startswith("BOTCHAN (MASTER DARLING)\n")
    assert "A NOTE BY THE TRANSLATOR" in text
    assert "gutenberg" not in text.lower()                           # header/footer/licence removed


# --- the tokenizer -----------------------------------------------------------------------------

def test_tokenizer_round_trips_the_whole_corpus(text, tok):
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert tok.decode(ids) == text
    assert tok.decode(ids[:100].tolist()) == text[:100]              # a list works too
    assert tok.vocab_size == len(tok.chars) == len(set(text)) == 78
    assert list(tok.chars) == sorted(tok.chars)


def test_tokenizer_is_deterministic():
    a = CharTokenizer.from_text("hello world")
    b = CharTokenizer.from_text("world hello")                       # same characters, other order
    assert a.chars == b.chars == (" ", "d", "e", "h", "l", "o", "r", "w")
    assert a.encode("hello").tolist() == [3, 2, 4, 4, 5]


def test_tokenizer_errors():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="'é'"):
        tok.encode("abé")
    with pytest.raises(ValueError, match="token id 3"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode(torch.tensor([-1]))
    with pytest.raises(ValueError):
        CharTokenizer.from_text("")
    with pytest.raises(ValueError):
        CharTokenizer(["a", "a"])


# --- split and blocks --------------------------------------------------------------------------

def test_split_tokens():
    t = torch.arange(100)
    train, val = split_tokens(t)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))
    train, val = split_tokens(t, val_fraction=0.25)
    assert len(train) == 75 and len(val) == 25
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            split_tokens(t, bad)


def test_token_blocks_contents_and_shift():
    T = 5
    ds = TokenBlocks(torch.arange(23), T)            # 22 usable (x, y) positions → 4 full blocks
    assert len(ds) == 4
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.tolist() == list(range(i * T, i * T + T))
        assert y.tolist() == list(range(i * T + 1, i * T + T + 1))
    with pytest.raises(IndexError):
        ds[4]
    assert len(TokenBlocks(torch.arange(21), T)) == 4   # 21 tokens: exactly 4 blocks with targets
    assert len(TokenBlocks(torch.arange(20), T)) == 3   # the 4th block would lack its last target


def test_token_blocks_errors():
    assert len(TokenBlocks(torch.arange(6), 5)) == 1
    with pytest.raises(ValueError, match="too few"):
        TokenBlocks(torch.arange(5), 5)
    with pytest.raises(ValueError, match="block_size"):
        TokenBlocks(torch.arange(10), 0)


# --- sharding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle", [True, False])
def test_shards_are_disjoint_and_cover_one_epoch(world_size, shuffle):
    T, n_blocks, epoch = 4, 37, 3
    ds = TokenBlocks(torch.arange(n_blocks * T + 1), T)
    shards = []
    for rank in range(world_size):
        loader = distributed_loader(ds, 1, rank=rank, world_size=world_size, seed=7, shuffle=shuffle)
        loader.sampler.set_epoch(epoch)
        shards.append([i for x, _ in loader for i in block_ids(x, T)])
    per_rank = n_blocks // world_size                   # drop_last: the remainder is left out
    assert all(len(s) == per_rank for s in shards)
    seen = [i for s in shards for i in s]
    assert len(set(seen)) == len(seen)                  # disjoint
    # together: the first per_rank * world_size blocks of this epoch's order
    order = (torch.randperm(n_blocks, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
             if shuffle else list(range(n_blocks)))
    assert set(seen) == set(order[:per_rank * world_size])
    # rank r takes every world_size-th block of that order, starting at r
    for rank, s in enumerate(shards):
        assert s == order[rank:per_rank * world_size:world_size]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_rank_takes_the_same_number_of_full_batches(world_size):
    T, B = 4, 3
    ds = TokenBlocks(torch.arange(37 * T + 1), T)
    loaders = [distributed_loader(ds, B, rank=r, world_size=world_size) for r in range(world_size)]
    counts = {len(list(loader)) for loader in loaders}
    assert counts == {(37 // world_size) // B}
    assert all(x.shape == (B, T) and y.shape == (B, T) for loader in loaders for x, y in loader)
    assert all(loader.num_workers == 0 and loader.drop_last for loader in loaders)


def test_loader_errors():
    ds = TokenBlocks(torch.arange(41), 4)               # 10 blocks
    with pytest.raises(ValueError, match="not one full batch"):
        distributed_loader(ds, 4, rank=0, world_size=3)  # 3 blocks per rank
    with pytest.raises(ValueError):
        distributed_loader(ds, 1, rank=2, world_size=2)  # no such rank


# --- epochs ------------------------------------------------------------------------------------

def epoch_orders(loader, n_epochs, start_epoch=0):
    """{epoch: block ids in the order the loader gave them} for n_epochs epochs of batches()."""
    orders = {}
    for epoch, step, x, _ in batches(loader, start_epoch=start_epoch):
        if epoch == start_epoch + n_epochs:
            break
        assert step == len(orders.get(epoch, [])) // len(x)
        orders.setdefault(epoch, []).extend(block_ids(x, 4))
    return orders


def test_batches_reshuffles_each_epoch_and_is_reproducible():
    ds = TokenBlocks(torch.arange(40 * 4 + 1), 4)
    loader = distributed_loader(ds, 5, rank=1, world_size=2, seed=3)
    # the pitfall: a sampler whose epoch is never set gives the same order every time
    assert [block_ids(x, 4) for x, _ in loader] == [block_ids(x, 4) for x, _ in loader]

    orders = epoch_orders(loader, 3)
    assert list(orders) == [0, 1, 2] and all(len(o) == 20 for o in orders.values())
    assert orders[0] != orders[1] != orders[2]          # set_epoch was called: new order each epoch
    assert orders[0] != sorted(orders[0])               # shuffled
    fresh = distributed_loader(ds, 5, rank=1, world_size=2, seed=3)
    assert epoch_orders(fresh, 3) == orders             # the same seed gives the same epochs
    for epoch, order in orders.items():                 # ... and exactly the sampler's order
        sampler = DistributedSampler(ds, num_replicas=2, rank=1, seed=3, drop_last=True)
        sampler.set_epoch(epoch)
        assert order == list(sampler)


def test_batches_resumes_at_start_epoch():
    ds = TokenBlocks(torch.arange(40 * 4 + 1), 4)
    full = epoch_orders(distributed_loader(ds, 5, rank=0, world_size=2), 4)
    resumed = epoch_orders(distributed_loader(ds, 5, rank=0, world_size=2), 2, start_epoch=2)
    assert resumed == {2: full[2], 3: full[3]}


def test_batches_refuses_an_empty_loader():
    with pytest.raises(ValueError, match="no batch"):
        next(batches(DataLoader(list(range(3)), batch_size=4, drop_last=True)))
