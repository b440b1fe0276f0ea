"""Real remote-code checkpoints (ChatGLM 1/2/3, MOSS, InternLM 1/2, Baichuan 1/2) under the transformers we use.

Each family module either converts the checkpoint once to an equivalent native architecture, or fixes the
checkpoint's own classes in memory (never its files), one named fix per upstream defect.
"""

from .loading import load_remote_model, load_remote_tokenizer, remote_model_class

__all__ = ["load_remote_model", "load_remote_tokenizer", "remote_model_class"]
