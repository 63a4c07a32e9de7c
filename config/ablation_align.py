# LRC w/o the alignment-free property (paper Sec. 6.2, Fig. 3): the attention and FFN outputs are
# compared through separate trainable alignment matrices instead of the P_o, P_down that generate
# the student's weights. Combine with a recipe, this file last:
#   torchrun --nproc_per_node=8 train.py config/lrc_qwen.py config/ablation_align.py --teacher=... --data_dir=...
alignment = "explicit"  # alignment matrices ~ N(0, init_std) like the projections
out_dir = out_dir + "_align"
