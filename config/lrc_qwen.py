# LRC-1.7B-Base: Qwen2.5-3B-Instruct (d_T 2048) -> d_S 1200, 20B tokens (paper Table 1, SPEC §1).
#   torchrun --nproc_per_node=8 train.py config/lrc_qwen.py --teacher=/models/Qwen2.5-3B-Instruct --data_dir=data/lrc
# data: FineWeb-Edu (int_score >= 4) + OpenHermes-2.5, docs joined by EOS, prepared with data.py
# Adam (0.9, 0.999), no weight decay, clip 1.0, warmup 0.5% then linear decay, T=40 with the official KL
# scaling: train.py's defaults are the paper's, so only what differs is set here.
teacher = ""  # set --teacher= to the HF dir of Qwen2.5-3B-Instruct
data_dir = ""  # set --data_dir= to the output of data.py for that teacher
out_dir = "out/lrc_qwen"
d_student = 1200
alpha = 0.5
block_size = 2048
batch_size = 2  # x 8 GPUs x grad_accum 1 = 16 sequences = 32,768 tokens per step (paper)
grad_accum = 1
_gpus = 8
max_steps = 20_000_000_000 // (batch_size * block_size * grad_accum * _gpus)  # 20B tokens: 610,351 steps
lr = 6.7e-5
eval_interval = 2000
eval_batches = 20
log_interval = 20
ckpt_interval = 2000
export_dtype = "bfloat16"
dtype = "bfloat16"
compile = True
