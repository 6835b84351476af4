"""ServerApp: FedAvg over the nodes' LoRA updates, checkpoints and communication accounting."""
