# LRC from Llama-3.1-8B-Instruct (d_T 4096, 32 layers, 32 q / 8 kv heads of 128, FFN 14336, untied
# head) -> d_S 2048, a 4.0B student, sharded over the GPUs (shard.py).
#   torchrun --nproc_per_node=8 train.py config/lrc_llama_8b.py --teacher=/models/Llama-3.1-8B-Instruct --data_dir=data/lrc_llama_8b
#   python bench.py memory config/lrc_llama_8b.py     # predicted peak memory and traffic per GPU
# The teacher of the LRC follow-ups; d_S 2048 is the student width this repository asks for. The
# student costs 1,960,513 parameters per unit of width (2 x 128,256 embedding / head rows + 32 layers
# x (53,248 weight columns + 2 norms) + 1 norm): 4.02B at 2048 (= 32 heads x 64). Trainable: 1.90B
# projections and norms, 7.1 GiB in fp32 and twice that in Adam's state: sharded with the teacher
# (shard="all"), 8 x 80 GB hold it with room (results/gpu.md). Not published for this teacher: lr,
# tokens per step and tokens; taken from config/lrc_qwen_4b.py (itself the LRC-1.7B values and
# LRC-4B's 18B tokens), untuned. rope_scaling (llama3) is implemented: keep the teacher's config.json.
teacher = ""  # set --teacher= to the HF dir of Llama-3.1-8B-Instruct
data_dir = ""  # set --data_dir= to the output of data.py for that teacher
out_dir = "out/lrc_llama_8b"
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
