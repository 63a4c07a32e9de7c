# LRC-1.5B-SFT: supervised fine-tuning of the LRC-1.5B student (config/lrc_llama.py) on
# UltraChat-200k (seed card 001; paper Table 8): lr 1e-5, 1 epoch (~0.2B tokens), cutoff 2048,
# warmup ratio 0.1, loss on assistant turns. Prepare the data with the student's tokenizer (the
# Llama-3 chat template) and its loss mask:
#   python data.py --tokenizer=out/lrc_llama/student --out=data/ultrachat --mask=True \
#       --source=ultrachat_200k/data/train_sft-00000-of-00003.parquet:field=messages  (one
#       --source=... per shard)
#   torchrun --nproc_per_node=8 train.py config/sft_llama.py --data_dir=data/ultrachat
method = "sft"  # LMOnly on every weight; targets are -100 where the mask is 0
init_from = "out/lrc_llama/student"  # the exported LRC-1.5B student (weights, config, tokenizer)
teacher = ""  # none: the tokenizer comes from init_from
data_dir = ""  # set --data_dir= to the output of data.py --mask=True
out_dir = "out/sft_llama"
block_size = 2048  # the cutoff length
batch_size = 4  # sequences per micro-batch per GPU; grad_accum follows from tokens_per_step
# 32 sequences of 2048 per step (the SFT batch size is not published): 8 GPUs x 4 x 1 micro-batch,
# 1 GPU x 4 x 8
tokens_per_step = 65_536
# One epoch of ~0.2B tokens (card 001): 3,051 steps on any number of GPUs. For one epoch of
# your data use --max_tokens=meta.json's tokens.train. Differences from the official SFT: Batches
# samples random windows of the packed conversations (joined by EOS) rather than one padded,
# truncated conversation per row.
max_tokens = 200_000_000
lr = 1e-5
min_lr = 0.0
warmup_ratio = 0.1
decay = "linear"  # the schedule after warmup is not published
beta1, beta2 = 0.9, 0.999
weight_decay = 0.0
grad_clip = 1.0
eval_interval = 250
eval_batches = 20
log_interval = 10
ckpt_interval = 500
export_dtype = "bfloat16"
dtype = "bfloat16"
compile = True
