"""Fast scale-out (PAPER.md section 6): the warm template that forks TEs, pre-warmed TEs, DRAM
pre-loading (the mmap'ed weight cache), and the autoscaler that decides when to use them."""
