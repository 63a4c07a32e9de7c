# LRC-1.5B-Base: Llama-3.2-3B-Instruct (d_T 3072) -> d_S 1536, 10B tokens (paper Table 1, SPEC §1).
#   torchrun --nproc_per_node=8 train.py config/lrc_llama.py --teacher=/models/Llama-3.2-3B-Instruct --data_dir=data/lrc_llama
# rope_scaling (llama3) is implemented: keep the teacher's config.json as it is (the official README nulls it).
# Adam (0.9, 0.999), no weight decay, clip 1.0, warmup 0.5% then linear decay, T=40 with the official KL
# scaling: train.py's defaults are the paper's, so only what differs is set here.
teacher = ""  # set --teacher= to the HF dir of Llama-3.2-3B-Instruct
data_dir = ""  # set --data_dir= to the output of data.py for that teacher
out_dir = "out/lrc_llama"
d_student = 1536
alpha = 0.2
block_size = 2048
batch_size = 3  # x 8 GPUs x grad_accum 1 = 24 sequences = 49,152 tokens per step (paper)
grad_accum = 1
_gpus = 8
max_steps = 10_000_000_000 // (batch_size * block_size * grad_accum * _gpus)  # 10B tokens: 203,450 steps
lr = 1e-4
eval_interval = 2000
eval_batches = 20
log_interval = 20
ckpt_interval = 2000
export_dtype = "bfloat16"
dtype = "bfloat16"
compile = True
