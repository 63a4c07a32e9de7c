# LRC-1.7B-Base: Qwen2.5-3B-Instruct (d_T 2048) -> d_S 1200, 20B tokens (paper Table 1, SPEC §1).
#   torchrun --nproc_per_node=8 train.py config/lrc_qwen.py --teacher=/models/Qwen2.5-3B-Instruct --data_dir=data/lrc
# data: FineWeb-Edu (int_score >= 4) + OpenHermes-2.5, docs joined by EOS, prepared with data.py
# Adam (0.9, 0.999), no weight decay, clip 1.0, warmup 0.5% then linear decay, T=40 with the
# official KL scaling: train.py's defaults are the paper's, so only what differs is set here.
teacher = ""  # set --teacher= to the HF dir of Qwen2.5-3B-Instruct
data_dir = ""  # set --data_dir= to the output of data.py for that teacher
out_dir = "out/lrc_qwen"
d_student = 1200
alpha = 0.5
block_size = 2048
# sequences per micro-batch per GPU; grad_accum follows from tokens_per_step and the GPU count
batch_size = 2
# 16 sequences of 2048 (paper): 8 GPUs x 2 x 1 micro-batch, 4 GPUs x 2 x 2, ...
tokens_per_step = 32_768
max_tokens = 20_000_000_000  # 20B tokens: 610,351 steps, whatever the number of GPUs
sampling = "epoch"  # one pass over the packed data, as the paper trains
lr = 6.7e-5
eval_interval = 2000
eval_batches = 20
log_interval = 20
ckpt_interval = 2000
export_dtype = "bfloat16"
dtype = "bfloat16"
compile = True
