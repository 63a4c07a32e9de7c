# The CPU demo (python demo.py): SmolLM2-135M-Instruct (d_T 576) -> a width-288 student on the King James Bible.
# demo.py sets teacher and data_dir; 288 = 32 x 9 heads, so transformers 5 loads the exported Llama student too.
out_dir = "out/demo"
d_student = 288
batch_size = 8
block_size = 256
grad_accum = 1
lr = 1e-3
warmup_ratio = 0.05
# Not the paper's setting: each clone term divided by its target's mean square. At this scale the paper's raw MSE
# is ruled by the teacher's massive activations; this reached a lower val loss at equal tokens (README, Results).
clone_norm = "target"
max_steps = 170  # about what 2 cores do in the time below, so the lr decay completes
max_minutes = 12.5  # wall-time bound of the training loop (compilation included)
dtype = "bfloat16"  # autocast with fp32 master weights: ~2x the fp32 speed on CPUs with AMX-bf16
compile = True  # ~3 min to compile on 2 cores, then ~2x faster again
eval_interval = 20
eval_batches = 4
log_interval = 5
ckpt_interval = 20
