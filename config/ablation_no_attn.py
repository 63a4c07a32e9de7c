# LRC w/o attention clone terms (paper Sec. 6.2, Fig. 3): combine with a recipe, this file last:
#   torchrun --nproc_per_node=8 train.py config/lrc_qwen.py config/ablation_no_attn.py --teacher=... --data_dir=...
clone_terms = "gate,up,ffn_out"  # without q, k, v, attn_out
out_dir = out_dir + "_no_attn"
