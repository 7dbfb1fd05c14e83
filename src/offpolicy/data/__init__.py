"""Tasks, rewards and (later) the replay buffer: the data side of the flow."""
