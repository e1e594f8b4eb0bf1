"""The long-running processes: trainer ranks, evaluator daemon, small CLIs. No math lives here."""
