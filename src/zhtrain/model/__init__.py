"""The model stage: load the base (config, weights, dtype), fit its vocabulary, attach LoRA."""
