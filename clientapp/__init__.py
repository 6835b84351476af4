"""ClientApp: what each SuperNode runs per round — local LoRA training on its own data."""
