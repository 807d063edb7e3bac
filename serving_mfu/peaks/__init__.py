"""The peak a utilization divides by (DESIGN §7): the datasheet table (table.py), a CPU's ISA peak
(cpu.py), a measured calibration (calibrate.py), and the one resolution order the engine uses (resolve.py)."""
