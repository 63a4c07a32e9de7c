# LRC-1.5B-Base: Llama-3.2-3B-Instruct (d_T 3072) -> d_S 1536, 10B tokens (paper Table 1, SPEC §1).
#   torchrun --nproc_per_node=8 train.py config/lrc_llama.py --teacher=/models/Llama-3.2-3B-Instruct --data_dir=data/lrc_llama
# rope_scaling (llama3) is implemented: keep the teacher's config.json as it is (the official README
# nulls it). Adam (0.9, 0.999), no weight decay, clip 1.0, warmup 0.5% then linear decay, T=40 with
# the official KL scaling: train.py's defaults are the paper's, so only what differs is set here.
teacher = ""  # set --teacher= to the HF dir of Llama-3.2-3B-Instruct
data_dir = ""  # set --data_dir= to the output of data.py for that teacher
out_dir = "out/lrc_llama"
d_student = 1536
alpha = 0.2
block_size = 2048
# sequences per micro-batch per GPU; grad_accum follows from tokens_per_step and the GPU count
batch_size = 3
# 24 sequences of 2048 (paper): 8 GPUs x 3 x 1 micro-batch, 4 GPUs x 3 x 2, ...
tokens_per_step = 49_152
max_tokens = 10_000_000_000  # 10B tokens: 203,450 steps, whatever the number of GPUs
sampling = "epoch"  # one pass over the packed data, as the paper trains
lr = 1e-4
eval_interval = 2000
eval_batches = 20
log_interval = 20
ckpt_interval = 2000
export_dtype = "bfloat16"
dtype = "bfloat16"
compile = True
