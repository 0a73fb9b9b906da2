"""Model input and output: resolution, lazy readers, the sharded writer, the model card."""
