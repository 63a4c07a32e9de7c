# LRC w/o any clone loss (paper Sec. 6.2, Fig. 3): L = L_KL + L_LM, the projections trained through
# them alone. Combine with a recipe, this file last:
#   torchrun --nproc_per_node=8 train.py config/lrc_qwen.py config/ablation_no_clone.py --teacher=... --data_dir=...
clone_terms = ""  # no term: alpha multiplies a zero clone loss and is irrelevant
out_dir = out_dir + "_no_clone"
