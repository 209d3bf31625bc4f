"""The tests' in-process builders under the name benchmarks/ imports them by (bench_distributed.py, crash_trials.py).

Tests use helpers.py directly; once the benchmarks import `helpers`, this file can go.
"""

from helpers import make_lines, make_sp_tokenizer, make_text_dir, make_tiny_llama

__all__ = ["make_lines", "make_sp_tokenizer", "make_text_dir", "make_tiny_llama"]
