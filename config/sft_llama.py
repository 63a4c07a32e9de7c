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
# x 8 GPUs x grad_accum 1 = 32 sequences = 65,536 tokens per step (the SFT batch size is not
# published)
batch_size = 4
grad_accum = 1
_gpus = 8
# One epoch of ~0.2B tokens (card 001). For exactly one epoch of your data use
# --max_steps=ceil(meta.json's tokens.train / tokens per step). Differences from the official SFT:
# Batches samples random windows of the packed conversations (joined by EOS) rather than one padded,
# truncated conversation per row.
max_steps = 200_000_000 // (batch_size * block_size * grad_accum * _gpus)  # 3,051 steps
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
