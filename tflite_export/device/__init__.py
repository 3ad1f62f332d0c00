"""The device and the reports: what a written file costs and does.

Device profiles (`target`), firmware flash, decode instructions and arena on a
microcontroller (`firmware`, `kernel_scratch`), the generated op resolver
(`resolver`), and host figures: bytes by part (`anatomy`), TFLM accuracy
(`evaluate`) and latency (`latency`).
"""
