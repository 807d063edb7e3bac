"""The stateful parts, engine side and reader side: settings (settings.py), the tracker that adds up
costed steps (tracker.py), the GPU sampler (gpu_util.py), traces (trace.py), and the snapshot transport:
an engine publishes (publish.py), a reader collects the files (collect.py) and adds them up
(aggregate.py).  seams.py says what the hook's collaborators must provide."""
