"""Running the model: decoding, scoring, reward verification, rollout backends."""
