"""What users reach over HTTP and in-process: the `/metrics/mfu` endpoints (api.py), the Prometheus
collector (prometheus.py) and `MFUMonitor` for `vllm.LLM` (monitor.py)."""
