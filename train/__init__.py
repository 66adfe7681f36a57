"""Training: pre-training (`train.pretrain`) and IPPO post-training (`train.ippo`), sharing `train.common`."""
