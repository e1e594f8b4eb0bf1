"""A training run around the step: its start-up in the checkpoint folder, its outputs, how it ends, and the
contract between lenet-train and lenet-launch. The processes in workers/ wire these parts; nothing here parses
flags or installs signal handlers."""
