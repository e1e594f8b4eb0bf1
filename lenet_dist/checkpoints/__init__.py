"""Checkpoints: the .npz format, the trainer's checkpoint folder, and which checkpoint a run resumes from."""
