"""zhtrain: adapt LLaMA-family language models to Chinese (or any new language)."""

import os

# zhtrain never downloads weights or data at run time: everything is local paths.
# Set HF_HUB_OFFLINE=0 yourself if you really want hub ids resolved.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# OpenMP threads that wait by spinning collapse when the cores are shared (other jobs, dataloader
# workers, tokenizer threads): the P3 training step measured 2x slower with torch's default than with
# PASSIVE beside two busy processes on 2 cores (7-10x beside a shared session's jobs), and within noise
# of it on free cores (README, Performance). Set OMP_WAIT_POLICY yourself to choose otherwise. Must be
# set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
