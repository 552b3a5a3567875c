"""ReMix: Mixture-of-LoRA models with constant routing weights and RLOO-trained routers."""

__version__ = "0.1.0"
