"""The image expert: a torchvision CNN fine-tuned on museum photos or any folder-per-class set."""
