"""Redis + RQ: key names, the job, the worker, recovery of dead workers' jobs, shared rate limits."""
