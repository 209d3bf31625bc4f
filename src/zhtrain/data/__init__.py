"""Data stages: plain-text folders -> token blocks (text.py)."""
