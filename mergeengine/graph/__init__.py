"""Step DAG (one node per recipe step), tensor-level plan, and schedule."""
