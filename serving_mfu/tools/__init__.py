"""The `serving-mfu` CLI and everything it runs: the demo, the vLLM server launcher, tiny local models,
benchmarks, estimator comparisons, analysis and figures.  Never imported by the layers below."""
