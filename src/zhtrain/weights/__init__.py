"""The weights stage: Hugging Face folders shard by shard, Meta .pth, adapter files, the merge plan,
verification against PEFT.
"""
