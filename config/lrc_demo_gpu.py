# The demo on one GPU (python demo.py config/lrc_demo_gpu.py), on top of config/lrc_demo.py: the
# teacher and width-288 student, 25M tokens instead of 0.2M. By the demo's measured scaling
# (≈ 0.1 nats of held-out gap per doubling of tokens, results/demo.md), about what the held-out
# goal (gap ≤ 1.0 nat) needs; untested on a GPU so far (results/demo.md says what has run).
# The teacher writes 25x the shipped corpus on the GPU (cached), so the run sees ≈ 5 epochs of it
# instead of 900 epochs of the shipped one.
out_dir = "out/demo_gpu"
corpus = ""
corpus_texts = 19_200
corpus_chats = 1_376  # every question QUESTIONS and TOPICS make
batch_size = 64
tokens_per_step = 65_536  # 4 micro-batches of 64 x 256
max_tokens = 384 * 65_536  # 25.2M tokens, 384 steps
lr = 1e-4  # a 32x larger batch than the CPU demo's takes a larger step
device = "cuda"
compile = True
eval_interval = 64
eval_batches = 16
log_interval = 16
ckpt_interval = 128
