"""Training loops (pretrain, finetune), evaluation, checkpoints and logging."""
