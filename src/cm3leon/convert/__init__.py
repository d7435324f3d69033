"""Checkpoint conversion: CM3Leon model directories <-> Hugging Face OPT (hf_opt.py)."""
