"""What the FedLoRA coordinator and workers share: the wire contract, manifests, chunking, aggregation math."""
