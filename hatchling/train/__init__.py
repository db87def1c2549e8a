"""Training: the shared loop (pretrain, and later SFT and RL), checkpoints, optimizers."""
