# LRC from Qwen3-8B (d_T 4096, 36 layers, 32 q / 8 kv heads of 128, FFN 12288, untied head) -> d_S
# 2048, a 4.1B student (Qwen3-4B's size, 4.02B), sharded over the GPUs (shard.py).
#   torchrun --nproc_per_node=8 train.py config/lrc_qwen3_8b.py --teacher=/models/Qwen3-8B --data_dir=data/lrc_qwen3_8b
#   python bench.py memory config/lrc_qwen3_8b.py     # predicted peak memory and traffic per GPU
# Not a published recipe. The student costs 1,999,689 parameters per unit of width (2 x 151,936
# embedding / head rows + 36 layers x (47,104 weight columns + 2 norms) + 1 norm): 4.10B at 2048.
# Qwen3's q/k norms are the teacher's, frozen (lrc.py; docs/qwen3.md). Trainable: 2.13B projections
# and norms; sharded with the teacher (shard="all"): 56.7 GiB per GPU on 8 ranks, 68.1 with the teacher whole. lr, tokens per step and tokens are
# config/lrc_qwen_4b.py's (the LRC-1.7B values, LRC-4B's 18B tokens), untuned for this teacher; data:
# as config/lrc_qwen3.py, tokenised with Qwen3-8B's tokenizer.
teacher = ""  # set --teacher= to the HF dir of Qwen3-8B
data_dir = ""  # set --data_dir= to the output of data.py for that teacher
out_dir = "out/lrc_qwen3_8b"
d_student = 2048
alpha = 0.5
block_size = 2048
# sequences per micro-batch per GPU; grad_accum follows from tokens_per_step and the GPU count
batch_size = 2
# 16 sequences of 2048: 8 GPUs x 2 x 1 micro-batch, 4 GPUs x 2 x 2, ...
tokens_per_step = 32_768
max_tokens = 18_000_000_000  # 549,316 steps, whatever the number of GPUs
sampling = "epoch"  # one pass over the packed data, as the paper trains
lr = 6.7e-5
shard = "all"  # FSDP2: projections, their gradients, Adam's state and the teacher's layers
eval_interval = 2000
eval_batches = 20
log_interval = 20
ckpt_interval = 2000
export_dtype = "bfloat16"
dtype = "bfloat16"
compile = True
