"""The low layer: atomic writes, progress lines, errors, data-parallel steps and FSDP2 gathering (imports nothing of dirl_min)."""
