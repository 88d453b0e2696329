"""RoBERTa (model_type "roberta"): BERT's tensors, but position ids count from
pad_id + 1 over the tokens that are not padding (padding keeps pad_id), as its
checkpoints expect; padding is id 1 unless config.json says otherwise."""

from __future__ import annotations

from typing import ClassVar

import torch

from runtime.families.bert import Bert


class Roberta(Bert):
    name: ClassVar[str] = "roberta"
    task_prefix: ClassVar[str] = "roberta."
    default_pad_id: ClassVar[int] = 1

    def first_position(self, c) -> int:
        return c.pad_id + 1

    def positions(self, ids: torch.Tensor, c) -> torch.Tensor:
        real = (ids != c.pad_id).long()
        return torch.cumsum(real, dim=-1) * real + c.pad_id
