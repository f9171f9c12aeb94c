"""What a training step does: losses, hard attention, self-critical training,
optimizer, state."""
