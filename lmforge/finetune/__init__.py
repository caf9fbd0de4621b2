"""Post-training methods (`lmforge finetune METHOD`): sft, reward, dpo, grpo, ppo, classify, seq2seq.

Each is a module holding only what differs (its config, its flags, its TrainJob); `scaffold` runs
them all the same way (one config path, the one training loop). `api.finetune` is the Python entry.
"""
