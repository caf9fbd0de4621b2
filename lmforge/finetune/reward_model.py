"""`lmforge finetune reward`: a reward model from preference pairs (Bradley-Terry).

The model is the base decoder with its LM head replaced by a scalar score head read at the last
real token of prompt + completion (family "decoder_classifier", num_labels 1; models/heads.py).
Loss -logsigmoid(r_chosen - r_rejected [- margin]) (+ reward.center_coef * mean((r_c + r_r)^2)).
Logs accuracy, margin and the mean chosen / rejected reward. The run directory loads with
`LLM.load` and scores with `LLM.score(prompt, completion)` / `lmforge score`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from lmforge.data.table import data_fingerprint
from lmforge.finetune.align_common import REPORT_PPL, AlignTrainConfig, resolved
from lmforge.finetune.base_model import chat_model_files, load_base, pad_id_of
from lmforge.finetune.preference import RewardObjective, pair_batches, training_pairs
from lmforge.train import distributed as D
from lmforge.train.adapters import LoRAConfig
from lmforge.train.job import TrainJob


@dataclass
class RewardSection:
    center_coef: float = field(default=0.0, metadata={"help": "reward centring coefficient (0 = off; TRL's center_rewards_coefficient)"})
    use_margin: bool = field(default=False, metadata={"help": "subtract each pair's 'margin' field inside the loss"})
    max_length: Optional[int] = field(default=None, metadata={"help": "prompt + completion tokens; longer pairs are dropped (default: the model's context)"})


@dataclass
class RewardRunConfig:
    train: AlignTrainConfig = field(default_factory=AlignTrainConfig)
    reward: RewardSection = field(default_factory=RewardSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


CONFIG = RewardRunConfig  # `lmforge finetune reward --help-config`


def build_job(cfg: RewardRunConfig, args: Any) -> TrainJob:
    from lmforge.models.heads import DecoderClassifier

    t = cfg.train
    llm = load_base(args.base, "reward")
    tok = llm.tokenizer
    train_enc, val_enc = training_pairs("reward", args, tok, cfg.reward.max_length or int(llm.model.cfg.block_size),
                                        t.seed)
    pad = pad_id_of(tok)
    per_step = t.grad_accum * D.world_size()
    source = pair_batches(train_enc, pad, t.micro_batch_size, per_step, t.seed)
    val_source = pair_batches(val_enc, pad, t.micro_batch_size, 1, 0, shuffle=False) if val_enc else None
    base = llm.model

    def build_model() -> torch.nn.Module:
        # The loop seeds before this, so the fresh score head is initialised reproducibly.
        return DecoderClassifier.from_decoder(base, num_labels=1)

    return TrainJob(name="reward", config=resolved("reward", args, cfg), build_model=build_model,
                    objective=RewardObjective(cfg.reward.center_coef, cfg.reward.use_margin), train_batches=source,
                    eval_batches=val_source.all_batches if val_source else None,
                    files=chat_model_files(llm, args.base), data_fingerprint={"data": data_fingerprint([args.data])},
                    report_perplexity=REPORT_PPL,
                    description=f"{len(train_enc)} pairs, global batch {t.micro_batch_size * per_step} pairs",
                    head_modules=("score",))  # the reward head is trained in full under LoRA
