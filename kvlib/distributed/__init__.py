"""Several processes over torch.distributed: disaggregated prefill and decode, tensor parallelism."""
