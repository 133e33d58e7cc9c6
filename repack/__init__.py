"""w3repack: lossless 3-bit -> 4-bit GPTQ repacking for MoE checkpoints."""

__version__ = "0.1.0"
