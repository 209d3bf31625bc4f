"""zhtrain: adapt LLaMA-family language models to Chinese (or any new language)."""

import os

# zhtrain never downloads weights or data at run time: everything is local paths.
# Set HF_HUB_OFFLINE=0 yourself if you really want hub ids resolved.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__version__ = "0.1.0"
