"""Redis + RQ: producing jobs, the job runtime and the worker process, recovery, shared rate limits, key names."""
