"""What every stage shares: the loop, checkpoints, optimizer, precision, memory plan, devices, ranks, logging, held-out evaluation."""
