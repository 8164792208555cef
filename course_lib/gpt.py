"""Chapter 09b's model and data: a small decoder-only GPT, a character tokenizer, and its batches.

    tok = CharTokenizer(TEXT)                         # one id per distinct character
    train, val = split(tok.encode(TEXT))              # a fixed split: the first 90 % trains
    x, y = global_batch(train, step, batch_size=8, seq_len=32, seed=0)   # y is x shifted by one
    x_mine = data_shard(x, data_rank, data_ranks)     # this data-parallel rank's rows
    model = make_gpt(tok.vocab_size, seq_len=32, d_model=64, n_layers=4, seed=0)
    logits = model(x)                                 # (batch, seq, vocab)

The model is an ``nn.Sequential`` — embedding, ``n_layers`` causal pre-norm blocks
(:class:`course_lib.models.TransformerBlock`, or :class:`MoEBlock` with a mixture-of-experts
feed-forward), head — so a pipeline can cut it between layers (chapter 06). The text ships
here, written for this course (no download at run time), so every run on every machine
sees the same characters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from course_lib import moe
from course_lib.models import MLP, TransformerBlock, shard

if TYPE_CHECKING:
    from collections.abc import Iterable


#: The course's own text (written for it, free to use): a few kilobytes of plain English.
TEXT = """\
The keeper of the lighthouse on the northern point kept two books. In the first he wrote the
weather: the wind at dawn, the height of the sea, the colour of the sky when the lamp was lit.
In the second he wrote what the weather had done to the people of the village below. The first
book was short and plain. The second grew long, because the village had many boats and the sea
had many moods.

Every evening he climbed the hundred and twelve steps, trimmed the wick, wound the clockwork
that turned the lens, and watched the beam sweep over the water. Four turns a minute, he told
the children who came up to see it, no more and no less, so that a sailor who counts can tell
this light from the one on the island to the south, which turns three times.

One winter the clockwork began to slow. It lost a turn in an hour, then a turn in half an hour.
The keeper took it apart on the kitchen table, laid every wheel on a white cloth in the order
it had come out, and found a tooth worn thin on the smallest gear. He had no spare. So he made
one: he cut it from a brass plate with a file, tried it, filed again, and tried again, until
the wheels ran as smoothly as before. It took him nine nights. On each of them he turned the
lens by hand, four turns a minute, counting aloud so that he would not fall asleep.

The fishermen never knew. They saw the light turn as it always had, and they came home.

When the keeper grew old a young woman came to learn the work. He showed her the two books
first. The weather is the same everywhere, he said, but the second book is this place alone.
Read it and you will know which rocks move in a storm and which boats go out too early. She
read both books through the spring. In the summer she trimmed the wick and wound the clock.
In the autumn she filed a new tooth for the smallest gear, because the old man's was worn thin
again, and she did it in four nights instead of nine, because his notes told her where to cut.

Many hands, one light, she wrote on the first page of a third book, and under it the rule the
old keeper had taught her: divide the work so that each part is small, and check that the parts
together do exactly what the whole did. A light that turns four times a minute must turn four
times a minute whoever winds the clock.

In the third book she wrote how the work was shared. One person wound the clock, one trimmed
the wick, one kept the books, and each wrote down what the others needed to know before the
night began. If the one who wound the clock was late, the others waited, and the light still
turned on time. If two people trimmed the wick at once they burned their fingers, so the book
said who trimmed it on which night. The village grew, more boats went out, and the light
turned, four times a minute, every night of the year.
"""


class CharTokenizer:
    """One id per distinct character of ``text``, in sorted order: ``encode`` and ``decode``."""

    def __init__(self, text: str = TEXT):
        if not text:
            raise ValueError("the tokenizer needs a non-empty text to learn its characters from")
        self.chars = sorted(set(text))
        self.ids = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        unknown = sorted(set(text) - set(self.ids))
        if unknown:
            raise ValueError(f"characters {unknown[:5]} are not in the tokenizer's vocabulary")
        return torch.tensor([self.ids[c] for c in text], dtype=torch.long)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def split(ids: torch.Tensor, train_fraction: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed split: the first ``train_fraction`` of the tokens train, the rest validate."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be between 0 and 1, got {train_fraction}")
    cut = int(len(ids) * train_fraction)
    return ids[:cut], ids[cut:]


def global_batch(
    ids: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s whole batch: ``batch_size`` windows of ``seq_len`` tokens (x) and the same
    windows one token later (y, the next character to predict). The windows' starts depend only
    on (seed, step), so every rank of every configuration draws the same global batch."""
    if len(ids) <= seq_len + 1:
        raise ValueError(f"{len(ids)} tokens are too few for windows of seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=g)
    x = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + seq_len + 1] for s in starts.tolist()])
    return x, y


def data_shard(batch: torch.Tensor, data_rank: int, data_ranks: int) -> torch.Tensor:
    """Rows [r·B/D, (r+1)·B/D) of a global batch of B rows for data rank r of D."""
    return shard(batch, data_rank, data_ranks)


# ----------------------------------------------------------------------------
# the model


class Embedding(nn.Module):
    """Token plus learned position embedding. ``positions`` (set by a context-parallel trainer)
    are the global positions of the columns this rank holds; by default 0, 1, …, s−1."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.positions: torch.Tensor | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = self.positions if self.positions is not None else torch.arange(ids.shape[1])
        return self.tok(ids) + self.pos(positions)


class Head(nn.Module):
    """Final LayerNorm and the linear map to one logit per vocabulary entry."""

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


class MoEFeedForward(nn.Module):
    """A mixture-of-experts feed-forward on (batch, seq, d) activations: a gate, E expert MLPs,
    top-k routing (chapter 08's :func:`course_lib.moe.route`).

    ``expert_parallel(group)`` returns chapter 08's :class:`course_lib.moe.MoELayer` over the
    group's ranks, sharing this module's experts. The capacity factor E/k gives every expert
    room for every token, so no token is dropped and the output does not depend on how the
    tokens are split over ranks (the condition for equality with one process).
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int = 4, k: int = 2):
        super().__init__()
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(d_model, d_hidden) for _ in range(num_experts))
        self.k, self.capacity_factor = k, num_experts / k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(0, -2)
        routing = moe.route(self.gate(tokens), self.k, self.capacity_factor)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            weight = (routing.weight * (routing.expert_index == e)).sum(dim=1, keepdim=True)
            out = out + weight * expert(tokens)
        return out.view_as(x)


class MoEBlock(TransformerBlock):
    """A causal pre-norm block whose feed-forward is a :class:`MoEFeedForward`."""

    def __init__(self, d_model: int, n_heads: int, d_hidden: int, num_experts: int = 4, k: int = 2):
        super().__init__(d_model, n_heads, d_hidden, causal=True)
        self.mlp = MoEFeedForward(d_model, d_hidden, num_experts, k)


def make_gpt(
    vocab_size: int,
    seq_len: int = 32,
    d_model: int = 64,
    n_heads: int = 4,
    n_layers: int = 4,
    d_hidden: int | None = None,
    moe: bool = False,
    num_experts: int = 4,
    k: int = 2,
    seed: int = 0,
) -> nn.Sequential:
    """Embedding, ``n_layers`` causal blocks, head: the same numbers on every rank for one seed."""
    for name, value in (("seq_len", seq_len), ("d_model", d_model), ("n_layers", n_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    d_hidden = d_hidden or 4 * d_model
    torch.manual_seed(seed)
    blocks = [
        MoEBlock(d_model, n_heads, d_hidden, num_experts, k)
        if moe
        else TransformerBlock(d_model, n_heads, d_hidden, causal=True)
        for _ in range(n_layers)
    ]
    return nn.Sequential(Embedding(vocab_size, seq_len, d_model), *blocks, Head(d_model, vocab_size))


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of every position's next-character prediction."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="sum")
