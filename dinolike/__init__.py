"""dinolike: DINOv2-style self-supervised ViT pretraining."""
