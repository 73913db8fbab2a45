"""Networks: encoders, fast layers (layers + stem, applied by `fast.speed_up`), the functional inner loop."""
