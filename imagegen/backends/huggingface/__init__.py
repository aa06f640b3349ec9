"""Hugging Face's inference router and the providers behind it (backend `huggingface`)."""
