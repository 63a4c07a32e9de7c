# The CPU demo (python demo.py): SmolLM2-135M-Instruct (d_T 576) -> a width-288 student on the King James Bible.
# demo.py sets teacher and data_dir; 288 = 32 x 9 heads, so transformers 5 loads the exported Llama student too.
out_dir = "out/demo"
d_student = 288
batch_size = 8
block_size = 256
grad_accum = 1
lr = 1e-3
warmup_ratio = 0.02
max_steps = 1000
max_minutes = 12.0
dtype = "bfloat16"  # autocast with fp32 master weights: ~2x the fp32 speed on CPUs with AMX-bf16
eval_interval = 25
eval_batches = 4
log_interval = 5
ckpt_interval = 25
