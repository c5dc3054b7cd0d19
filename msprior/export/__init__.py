"""Export a trained prior for nn~ (TorchScript), quantize it, render audio previews."""
