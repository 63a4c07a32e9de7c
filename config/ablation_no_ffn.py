# LRC w/o FFN clone terms (paper Sec. 6.2, Fig. 3): combine with a recipe, this file last:
#   torchrun --nproc_per_node=8 train.py config/lrc_qwen.py config/ablation_no_ffn.py --teacher=... --data_dir=...
# The paper does not give the ablation runs' token budget (Fig. 3 plots LM loss against training
# time).
clone_terms = "q,k,v,attn_out"  # without gate, up, ffn_out
out_dir = out_dir + "_no_ffn"
