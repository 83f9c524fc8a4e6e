"""The built-in benchmark: data, the base model, expert training and the build's checks."""
