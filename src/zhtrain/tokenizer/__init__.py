"""The tokenizer stage: load tokenizers as the seed did, build and extend them.

loading: AutoTokenizer or the seed's SentencePiece ids (sentencepiece_llama); sentencepiece_model:
train and merge SentencePiece models; bpe: extend byte-level BPE tokenizers; corpus: reading and
sampling text; folder: output folders and their record. `zhtrain tokenizer` is build_tokenizer.py.
"""
