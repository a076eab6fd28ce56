"""The FedLoRA worker daemon and lab tools."""
