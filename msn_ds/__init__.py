"""msn_ds: Masked Siamese Networks pretraining at scale with DeepSpeed."""
__version__ = "0.1.0"
