"""Classical (non-learned) baselines reported side by side with the learned methods."""
