"""The FedLoRA coordinator."""
