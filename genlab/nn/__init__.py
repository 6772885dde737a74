"""Building blocks shared by model families (embeddings, attention, ResNet blocks, U-Net, transformer)."""
