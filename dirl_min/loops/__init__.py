"""The training loops: random-masking SFT, DiPO, and the state they save and resume."""
