# LRC on Qwen3: Qwen3-4B (d_T 2560, 36 layers, 32 q / 8 kv heads of 128, FFN 9728, tied) -> d_S
# 1088, 20B tokens.
#   torchrun --nproc_per_node=8 train.py config/lrc_qwen3.py --teacher=/models/Qwen3-4B --data_dir=data/lrc_qwen3
#   python bench.py memory config/lrc_qwen3.py            # predicted peak memory per GPU (no GPU, no weights)
# Not a published recipe: the paper has no Qwen3 teacher. d_S: the student costs 1,571,273
# parameters per unit of width (151,936 tied embedding rows + 36 layers x (39,424 weight columns + 2
# norms) + 1 norm), so d_S 1088 gives 1.71B parameters, the size of Qwen3-1.7B (1.72B), the model a
# user would otherwise take off the shelf; 1088 = 17 x 64 keeps the GEMMs aligned. (d_S 1152 would
# match LRC-1.7B's 1.81B instead.) Trainable: 0.70B projections and norms. Qwen3's q/k norms are the
# teacher's, frozen (lrc.py). Everything else is the LRC-1.7B recipe (config/lrc_qwen.py), untuned
# for this teacher. data: as config/lrc_qwen.py, tokenised with Qwen3-4B's tokenizer (Qwen2's
# vocabulary; OpenHermes rendered with Qwen3's chat template: docs/qwen3.md).
teacher = ""  # set --teacher= to the HF dir of Qwen3-4B
data_dir = ""  # set --data_dir= to the output of data.py for that teacher
out_dir = "out/lrc_qwen3"
d_student = 1088
alpha = 0.5
block_size = 2048
# sequences per micro-batch per GPU; grad_accum follows from tokens_per_step and the GPU count
batch_size = 2
# 16 sequences of 2048 (the LRC-1.7B value): 8 GPUs x 2 x 1 micro-batch, 4 GPUs x 2 x 2, ...
tokens_per_step = 32_768
# 20B tokens (the LRC-1.7B budget): 610,351 steps, whatever the number of GPUs
max_tokens = 20_000_000_000
sampling = "epoch"  # one pass over the packed data, as the paper trains
lr = 6.7e-5  # the LRC-1.7B value
eval_interval = 2000
eval_batches = 20
log_interval = 20
ckpt_interval = 2000
export_dtype = "bfloat16"
dtype = "bfloat16"
compile = True
