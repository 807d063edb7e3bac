"""The cost layer: what one engine step cost, as pure arithmetic (DESIGN §2–§5).

records.py (the IterationRecord an engine step becomes), counters.py (every counter, declared once,
and the types derived from it), flops.py and bytes.py (a model's coefficients), accounting.py (a step's
positions by class, costed per phase), time_split.py (a mixed step's time between the phases),
drafter.py (a speculative drafter's FLOPs), graph_padding.py (the positions a CUDA graph pads a step to),
roofline.py (a step's time by roofline part).  No threads, environment, torch or vLLM."""
