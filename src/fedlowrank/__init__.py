"""fedlowrank: communication-efficient federated fine-tuning."""
__version__ = "0.1.0"
