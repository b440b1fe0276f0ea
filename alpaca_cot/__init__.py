"""Alpaca-CoT: one interface over instruction data, LLM families and PEFT methods."""

__version__ = "0.1.0"
