# VanillaKD-Pretrain-Qwen-500M (MiniPLM's token-level KD baseline, seed card 003): a ~0.5B Qwen
# student from scratch, teacher Qwen1.5-1.8B, the Pile.
#   torchrun --nproc_per_node=8 train.py config/kd_qwen.py --teacher=/models/Qwen1.5-1.8B --data_dir=data/pile_qwen
# Sources: the card (teacher, the Pile, "50B tokens", 0.6B parameters) and MiniPLM's released
# scripts (github.com/thu-coai/MiniPLM: scripts/vanilla_kd/qwen/500M.sh, pretrain/kd_trainer.py,
# arguments.py). Qwen1.5's config.json says model_type "qwen2" (Qwen2ForCausalLM): model.py loads
# the teacher as it is.
teacher = ""  # set --teacher= to the HF dir of Qwen1.5-1.8B
data_dir = ""  # the Pile (monology/pile-uncopyrighted), prepared by data.py with the teacher's tokenizer
out_dir = "out/kd_qwen"
method = "kd"
# The student: Qwen1.5-0.5B's shape (d 1024, 24 layers, 16 heads, FFN 2816, tied; 0.62B parameters
# with the embedding), which matches the card's 0.6B; check against the released model's config.json
# if you have it. The path is relative to where train.py runs (the repo root).
student_config = "config/qwen_500m.json"
init_std = 0.02  # HF's initializer_range for Qwen2, as MiniPLM's --from-scratch uses
# L = kd_ratio * KD + (1 - kd_ratio) * LM, kd_ratio 0.5 (arguments.py default, not overridden by the
# script); the KD term at temperature 1, both terms per-token means. (MiniPLM logs the cross-entropy
# to p_T, which is this KL plus the teacher's entropy: same gradient.)
alpha_kl = 0.5
temperature = 1.0
kl_reduction = "token"
block_size = 1024  # documents packed into 1024-token instances
batch_size = 4  # sequences per micro-batch per GPU; grad_accum follows from tokens_per_step
# 512 sequences of 1024 per step (MiniPLM's batch): 8 GPUs x 4 x 16 micro-batches, 1 GPU x 4 x 128
tokens_per_step = 524_288
# 45,000 steps = 23.6B tokens, on any number of GPUs. MiniPLM gives every method the same training
# FLOPs as 50B tokens of plain pre-training (scripts/pretrain/qwen/500M.sh: 100k steps); online KD
# pays for the teacher's forward, hence fewer tokens. The card's "50B tokens" is that budget, not
# what this student saw.
_steps = 45_000
max_tokens = _steps * tokens_per_step
lr = 3e-4
min_lr = 3e-5
warmup_ratio = 2000 / _steps  # 2,000 warmup steps
decay = "cosine"
beta1, beta2 = 0.9, 0.98
# Not reproduced: MiniPLM uses AdamW (decoupled weight decay 0.01, eps 1e-6); train.py's Adam would
# apply weight decay as L2 and has no eps key, so weight decay stays off here.
weight_decay = 0.0
grad_clip = 1.0
eval_interval = 1000
eval_batches = 20
log_interval = 10
ckpt_interval = 1000
export_dtype = "bfloat16"
dtype = "bfloat16"
compile = True
