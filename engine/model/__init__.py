"""The decoder-only transformer (GPT-2 / Llama) and its size and FLOP arithmetic."""

from engine.model.flops import count_parameters, flops_per_token
from engine.model.gpt import GPT

__all__ = ["GPT", "count_parameters", "flops_per_token"]
