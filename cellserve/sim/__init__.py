"""The simulator: the real engine in virtual time, its executors priced from profiles."""
