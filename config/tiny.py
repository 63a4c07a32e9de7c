# A seconds-long run for tests and smoke checks: pass --teacher=DIR --data_dir=DIR --out_dir=DIR.
# Not a recipe: no token budget, so the tests can set grad_accum per rank count (1 rank x 2
# micro-batches against 2 ranks x --grad_accum=1); tests/test_configs.py leaves it out.
d_student = 16
batch_size = 2
block_size = 32
grad_accum = 2
lr = 3e-3
warmup_ratio = 0.2
max_steps = 6
eval_interval = 3
eval_batches = 2
log_interval = 2
ckpt_interval = 3
temperature = 2.0
