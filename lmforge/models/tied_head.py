"""What the language-model families share about their head: `lm_head` may be the token embedding
itself (`cfg.tie_embeddings`), stored once in a checkpoint and re-tied after loading (the
checkpoint-loading hooks of models/registry.py)."""

from __future__ import annotations

import torch


class TiedHeadHooks:
    """Mixin of a model with `tok_emb`, `lm_head` and `cfg.tie_embeddings`."""

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def tied_state_keys(self) -> list[str]:
        """State-dict keys that share storage with another tensor and are not saved."""
        return ["lm_head.weight"] if self.cfg.tie_embeddings else []

    def retie(self) -> None:
        """Share the head with the embedding again after loading (loading assigns separate tensors)."""
        if self.cfg.tie_embeddings and isinstance(self.tok_emb, torch.nn.Embedding):  # a quantised table ties itself
            self.lm_head.weight = self.tok_emb.weight
