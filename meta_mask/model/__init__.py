"""The BART encoder-decoder (bart.py), its generation (generate.py) and Hugging Face I/O (hf.py)."""
