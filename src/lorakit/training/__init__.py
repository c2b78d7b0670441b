"""The training loop and what it needs: data, loss, optimizer groups, checkpoints, evaluation,
built-in tasks."""
