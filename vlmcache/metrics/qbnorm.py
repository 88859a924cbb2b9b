"""Querybank normalisation (QB-Norm, Bogolin et al., CVPR 2022) for retrieval in the shared space.

Some gallery items ("hubs") are close to very many queries and crowd every result list. QB-Norm
rescores a query q against a gallery item g by an inverted softmax over a bank of *training* queries:

    score(q, g) = exp(β·s(q, g)) / Σ_{b in bank} exp(β·s(b, g))

so a hub, which is close to many bank queries, is divided by a large sum. Ranking by the logarithm,
β·s(q, g) − log Σ_b exp(β·s(b, g)), gives the same order. This is the paper's Dynamic Inverted Softmax:
a query is rescored only when its plain top-1 item is in the "activation set" (the items that are
the top-1 of some bank query); other queries keep their plain scores, so QB-Norm cannot hurt a query
that lands far from any bank query. The bank must never hold the queries being evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmcache.errors import VlmcacheError

BETAS = (10.0, 20.0, 30.0, 50.0)  # candidates for β, chosen on the validation split
QBNORM_SUFFIX = " + QB-Norm"


@dataclass
class QueryBank:
    """A gallery's normaliser from a bank of queries: β, log Σ_b exp(β·s(b, g)) per item, activation set."""

    beta: float
    log_norm: torch.Tensor  # (gallery,)
    active: torch.Tensor  # (gallery,) bool: the item is some bank query's plain top-1

    def rescore(self, scores: torch.Tensor) -> torch.Tensor:
        """Plain similarities (queries, gallery) -> QB-Norm scores (same ranking semantics: higher is better)."""
        normalised = self.beta * scores - self.log_norm[None, :]
        use = self.active[scores.argmax(dim=1)]
        return torch.where(use[:, None], normalised, scores)


def query_bank(bank: torch.Tensor, gallery: torch.Tensor, beta: float, chunk_size: int = 4096) -> QueryBank:
    """The normaliser of `gallery` (unit vectors) from `bank` query embeddings (unit vectors), in chunks."""
    bank, gallery = bank.float(), gallery.float()
    log_norm = torch.full((len(gallery),), -torch.inf)
    active = torch.zeros(len(gallery), dtype=torch.bool)
    for start in range(0, len(bank), chunk_size):
        scores = bank[start:start + chunk_size] @ gallery.T  # (chunk, gallery)
        log_norm = torch.logaddexp(log_norm, torch.logsumexp(beta * scores, dim=0))
        active[scores.argmax(dim=1)] = True
    return QueryBank(beta, log_norm, active)


def check_bank_split(bank_split: str, evaluated_split: str) -> None:
    """Refuse a querybank drawn from the split being evaluated (its queries would be scored against themselves)."""
    if bank_split == evaluated_split:
        raise VlmcacheError(f"QB-Norm bank split {bank_split!r} is the evaluated split; the bank must hold training "
                            "queries only (use --qbnorm-bank train, and evaluate another split)")
